"""Training data from several sources, polyp-free crops, per-source validation and the learning-rate schedule."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import tiny_config, write_clips
from vps.hardware import cpu_has_native_bf16
from vps.modeling import read_checkpoint
from vps.train.data import DataError, read_pair, split_sources
from vps.train.negatives import NEGATIVE_SOURCE, find_polyp_free_box, polyp_free_crops
from vps.train.trainer import learning_rate, learning_rate_depends_on_epochs, setup_runtime, train


def write_stills(root, count: int = 6, sizes=((60, 44), (48, 40), (72, 50)), seed: int = 1):
    """Kvasir layout root/{images,masks}/<id>.jpg with images of several sizes, masks as 3-channel JPEGs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        yy, xx = np.mgrid[:height, :width]
        cx, cy, r = rng.uniform(14, width - 14), rng.uniform(14, height - 14), rng.uniform(5, 8)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        image = rng.integers(20, 90, size=(height, width, 3)).astype(np.uint8)
        image[mask] = (220, 120, 90)
        Image.fromarray(image).save(root / "images" / f"k{index}.jpg", quality=95)
        Image.fromarray(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)).save(
            root / "masks" / f"k{index}.jpg", quality=95)
    return root


def test_each_source_keeps_its_own_seeded_split(tmp_path):
    clips = write_clips(tmp_path / "clips", clips=5, frames=3)
    stills = write_stills(tmp_path / "stills", count=10)
    train, val = split_sources([clips, stills], None, 0.2, seed=0)
    assert {s.source for s in train} == {"clips", "stills"}
    val_clips = {s.group for s in val if s.source == "clips"}
    val_stills = {s.group for s in val if s.source == "stills"}
    assert len(val_clips) == 1 and len(val_stills) == 2  # 20 % of 5 clips and of 10 stills
    assert not {s.group for s in train} & (val_clips | val_stills)  # split by clip, never by frame
    again_train, again_val = split_sources([clips, stills], None, 0.2, seed=0)
    assert again_val == val and again_train == train
    # one source alone gets the same split as in the mix
    assert split_sources(clips, None, 0.2, seed=0)[1] == [s for s in val if s.source == "clips"]


def test_named_validation_clips_apply_to_their_source_only(tmp_path):
    clips = write_clips(tmp_path / "clips", clips=3, frames=2)
    stills = write_stills(tmp_path / "stills", count=5)
    train, val = split_sources([clips, stills], ["c1"], 0.4, seed=0)
    assert {s.group for s in val if s.source == "clips"} == {"c1"}
    assert len({s.group for s in val if s.source == "stills"}) == 2
    with pytest.raises(DataError, match="not in the data: nope"):
        split_sources([clips, stills], ["c1", "nope"], 0.2)


def test_polyp_free_box_avoids_the_mask_and_keeps_the_aspect():
    mask = np.zeros((288, 384), dtype=bool)
    mask[100:180, 200:300] = True
    for seed in range(20):
        left, top, right, bottom = find_polyp_free_box(mask, 0.3, random.Random(seed))
        assert not mask[top:bottom, left:right].any()
        assert right - left >= 0.3 * 384 and bottom - top >= 0.3 * 288
        assert abs((right - left) / (bottom - top) - 384 / 288) < 0.05
    full = np.ones((50, 60), dtype=bool)
    assert find_polyp_free_box(full, 0.3, random.Random(0)) is None


def test_polyp_free_crops_hold_no_mask_pixel(tmp_path):
    stills = write_stills(tmp_path / "stills", count=12)
    train, _ = split_sources(stills, None, 0.0)
    crops = polyp_free_crops(train, fraction=1.0, min_fraction=0.3, seed=0)
    assert len(crops) >= 8  # small discs leave room in most images
    for crop in crops:
        image, mask = read_pair(crop)
        assert crop.source == NEGATIVE_SOURCE and not mask.any()
        left, top, right, bottom = crop.crop
        assert image.shape[:2] == (bottom - top, right - left)
    assert polyp_free_crops(train, 1.0, 0.3, seed=0) == crops  # the same crops on a rerun
    assert len(polyp_free_crops(train, 0.5, 0.3, seed=0)) < len(crops)
    with pytest.raises(DataError, match="fraction"):
        polyp_free_crops(train, 1.5)


def test_cosine_schedule_warms_up_decays_and_resumes_on_the_same_curve():
    settings = {"lr": 1e-3, "epochs": 10, "schedule": "cosine", "warmup_epochs": 1, "min_lr": 1e-5}
    rates = [learning_rate(settings, epoch) for epoch in range(10)]
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)
    assert all(b < a for a, b in zip(rates[1:], rates[2:]))
    assert rates[-1] == pytest.approx(1e-5)
    assert learning_rate({"lr": 1e-3, "epochs": 10}, 7) == 1e-3
    with pytest.raises(ValueError, match="schedule"):
        learning_rate({**settings, "schedule": "step"}, 0)


def test_cosine_schedule_by_step_warms_up_from_the_first_batch_and_decays_smoothly():
    settings = {"lr": 1e-3, "epochs": 4, "schedule": "cosine", "warmup_epochs": 1, "min_lr": 0.0,
                "schedule_by": "step"}
    steps = 10
    rates = [learning_rate(settings, epoch, step, steps) for epoch in range(4) for step in range(steps)]
    assert rates[0] == pytest.approx(1e-4)  # the warm-up starts low, from the first batch
    assert rates[:steps] == sorted(rates[:steps]) and rates[steps - 1] == pytest.approx(1e-3)
    decay = rates[steps:]
    assert decay[0] == pytest.approx(1e-3) and all(b < a for a, b in zip(decay, decay[1:]))
    assert max(abs(b - a) for a, b in zip(decay, decay[1:])) < 1.5e-4  # no jump between epochs
    assert decay[-1] < 0.01 * 1e-3  # near min_lr after the last batch
    assert learning_rate({**settings, "schedule_by": "epoch"}, 3, 5, steps) == learning_rate(
        {**settings, "schedule_by": "epoch"}, 3)  # by epoch: one rate per epoch, the last one min_lr
    assert learning_rate_depends_on_epochs(settings, 1) and not learning_rate_depends_on_epochs(settings, 0)
    assert not learning_rate_depends_on_epochs({**settings, "schedule_by": "epoch"}, 1)
    with pytest.raises(ValueError, match="schedule_by"):
        learning_rate({**settings, "schedule_by": "batch"}, 1, 0, steps)


def test_auto_precision_in_training_follows_the_cpu(monkeypatch):
    import vps.hardware

    monkeypatch.setattr(vps.hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert setup_runtime({"device": "cpu", "precision": "auto"}).precision == "bf16"
    monkeypatch.setattr(vps.hardware, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert setup_runtime({"device": "cpu", "precision": "auto"}).precision == "fp32"
    assert setup_runtime({"device": "cpu", "precision": "fp32"}).precision == "fp32"
    assert cpu_has_native_bf16({"avx512f", "amx_bf16"}) and not cpu_has_native_bf16({"avx512f", "avx2"})


def test_tiny_run_on_a_mix_of_clips_stills_and_polyp_free_crops(tmp_path, capsys):
    clips = write_clips(tmp_path / "clips", clips=3, frames=3)
    stills = write_stills(tmp_path / "stills", count=6)
    config = tiny_config(clips, tmp_path / "cache", epochs=2)
    config["data"].update({"root": [str(clips), str(stills)], "val_clips": None, "val_fraction": 0.34,
                           "negatives": {"train_fraction": 1.0, "val_fraction": 1.0, "min_side": 0.3}})
    config["train_g"].update({"schedule": "cosine", "warmup_epochs": 0, "min_lr": 1e-5})
    model_path = train(config, tmp_path / "run")
    printed = capsys.readouterr().out
    assert "polyp-free" in printed and "clips" in printed and "stills" in printed
    header = (tmp_path / "run" / "log_g.csv").read_text().splitlines()[0].split(",")
    assert {"val_dice_clips", "val_dice_stills", f"val_dice_{NEGATIVE_SOURCE}", "lr"} <= set(header)
    rows = [line.split(",") for line in (tmp_path / "run" / "log_g.csv").read_text().splitlines()[1:]]
    lr = [float(row[header.index("lr")]) for row in rows]
    assert lr[0] == pytest.approx(3e-3) and lr[1] == pytest.approx(1e-5)
    payload = read_checkpoint(model_path)
    assert "surrogate" in payload and payload["meta"]["trained_on"] == [str(clips), str(stills)]
    cached = list((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) > 9 + 6  # every image, every crop, two views of the training part


def _shrink_dataset_main():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "shrink_dataset.py"
    spec = importlib.util.spec_from_file_location("shrink_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_shrunk_copy_keeps_layout_stems_and_split_with_smaller_images(tmp_path, capsys):
    shrink_main = _shrink_dataset_main()
    stills = tmp_path / "stills"
    write_stills(stills, count=8, sizes=((120, 90), (40, 30)))
    assert shrink_main([str(stills), str(tmp_path / "small"), "--max-side", "60"]) == 0
    original, small = split_sources([stills], None, 0.25, 0), split_sources([tmp_path / "small"], None, 0.25, 0)
    assert [[s.group for s in part] for part in original] == [[s.group for s in part] for part in small]
    for before, after in zip(original[0] + original[1], small[0] + small[1]):
        image, mask = read_pair(before)
        small_image, small_mask = read_pair(after)
        assert after.image.suffix == ".jpg" and after.mask.suffix == ".png"
        assert max(small_mask.shape) == min(60, max(mask.shape))  # scaled down, never up
        assert small_image.shape[:2] == small_mask.shape
        assert abs(small_mask.mean() - mask.mean()) < 0.05  # the polyp keeps its share of the image

    assert shrink_main([str(stills), str(tmp_path / "small")]) == 2  # never writes into an existing folder
    assert shrink_main([str(stills), str(stills / "inside")]) == 2
    assert "error:" in capsys.readouterr().err


def test_geometric_draw_is_the_same_for_an_image_and_a_mask_of_another_size():
    import torch.nn.functional as F
    from vps.train.augment import build_geometric, geometric_pair

    transform = build_geometric({"hflip": True, "vflip": True, "rotate": 90, "scale": [0.75, 1.25]})
    torch.manual_seed(0)
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:30, 5:20] = 1
    image = F.interpolate(mask[None].repeat(1, 3, 1, 1), size=(96, 96), mode="nearest")[0]
    moved = 0
    for _ in range(10):
        image_out, mask_out = geometric_pair(transform, image, mask)
        assert image_out.shape == (3, 96, 96) and mask_out.shape == (1, 64, 64)
        image_as_mask = F.interpolate(image_out[None, :1], size=(64, 64), mode="area")[0] > 0.5
        assert (image_as_mask != (mask_out > 0.5)).float().mean() < 0.02  # only edge pixels differ
        moved += (mask_out != mask).float().mean() > 0.05
    assert moved >= 5
