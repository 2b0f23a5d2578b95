"""Training prompt-free heads through the embedding cache, several classes, random crops, and the trained
checkpoints in vps-segment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vps
from conftest import TINY_VIT
from test_segment_cli import read_pngs, segment
from test_train import TINY_SAM, tiny_config, write_clips
from test_video_io import make_video
from vps.config import ConfigError, training_stages, validate_config
from vps.modeling import PromptFreeSam, load_model_from_checkpoint, read_checkpoint
from vps.modeling.build_sam import build_sam_vit
from vps.train.crops import random_crops
from vps.train.data import discover_samples, read_pair
from vps.train.trainer import binary_dice, dice_bce_loss, train
from vps.video import read_mask_video

HEADS = ("vit", "cnn", "linear")


pytestmark = pytest.mark.usefixtures("one_thread")


def head_config(data_root: Path, cache_dir: Path, kind: str, epochs: int = 1) -> dict:
    """tiny_config with a prompt-free head instead of g and h."""
    config = tiny_config(data_root, cache_dir, epochs=epochs)
    for key in ("train_g", "train_h"):
        config.pop(key)
    head = {"type": kind, **({"hidden_channels": 8} if kind == "cnn" else {})}
    config["model"] = {"sam": dict(TINY_SAM), "head": head}
    config["train_head"] = {"epochs": epochs, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-5}
    return config


def write_classes(root: Path, classes=("gland", "lumen"), count: int = 4, size=(96, 80), seed: int = 0) -> Path:
    """Stills with one mask folder per class: root/images/<n>.png, root/masks/<class>/<n>.png (a disc, a bar)."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    yy, xx = np.mgrid[:height, :width]
    (root / "images").mkdir(parents=True)
    for name in classes:
        (root / "masks" / name).mkdir(parents=True)
    for n in range(count):
        cx, cy = rng.uniform(20, width - 20), rng.uniform(20, height - 20)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 12 ** 2
        bar = (abs(xx - width + cx) < 6) & (yy > 10)
        image = rng.integers(20, 90, size=(height, width, 3)).astype(np.uint8)
        image[disc], image[bar] = (220, 120, 90), (90, 200, 120)
        Image.fromarray(image).save(root / "images" / f"{n}.png")
        for name, mask in zip(classes, (disc, bar)):
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / name / f"{n}.png")
    return root


@pytest.fixture
def tiny_sam_everywhere(monkeypatch):
    """vps-segment rebuilds SAM from the checkpoint's backend name; here that gives the tiny random vit_b."""
    def build(backend, checkpoint=None, **kwargs):
        torch.manual_seed(0)
        return build_sam_vit(backend, image_size=64, patch_size=1, encoder_overrides=TINY_VIT)

    monkeypatch.setattr("vps.modeling.build.build_sam", build)


def test_loss_and_dice_are_per_class_channel():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 2, 16, 16), (torch.rand(3, 2, 16, 16) > 0.6).float()
    per_class = [dice_bce_loss(logits[:, k:k + 1], target[:, k:k + 1]) for k in range(2)]
    assert dice_bce_loss(logits, target).item() == pytest.approx(float(sum(per_class)) / 2, rel=1e-6)
    dice = binary_dice(logits, target)
    assert dice.shape == (3,)
    per_class_dice = [binary_dice(logits[:, k:k + 1], target[:, k:k + 1]) for k in range(2)]
    assert torch.allclose(dice, (per_class_dice[0] + per_class_dice[1]) / 2)


@pytest.mark.parametrize("kind", HEADS)
def test_train_each_head_through_the_cache_then_segment(tmp_path, capsys, kind, tiny_sam_everywhere):
    data = write_clips(tmp_path / "data", clips=3, frames=3)
    out = tmp_path / "run"
    model_path = train(head_config(data, tmp_path / "cache", kind, epochs=2), out, stages=("head",))
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))  # embeddings came from the cache
    assert len((out / "log_head.csv").read_text().strip().splitlines()) == 1 + 2
    payload = read_checkpoint(model_path)
    assert payload["meta"]["head"]["type"] == kind and "prompt_generator" not in payload
    model = load_model_from_checkpoint(model_path, "head")
    assert isinstance(model, PromptFreeSam) and model.num_classes == 1
    video = make_video(tmp_path / "clip.mp4", count=3, width=64, height=48)
    code, stdout, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--png-dir", tmp_path / "png",
                                "--model", "head", "--checkpoint", model_path, "--batch-size", 2, "--quiet")
    assert code == 0, err
    assert read_mask_video(tmp_path / "m.mp4").shape == (3, 48, 64)
    assert len(read_pngs(tmp_path / "png" / "clip")) == 3
    code, _, err = segment(capsys, video, "--out", tmp_path / "m2.mp4", "--checkpoint", model_path, "--quiet")
    assert code == 2 and "use --model head" in err


def test_several_classes_random_crops_and_outputs_per_class(tmp_path, capsys, tiny_sam_everywhere):
    data = write_classes(tmp_path / "glas")
    config = head_config(data, tmp_path / "cache", "vit")
    config["data"].update(classes=["gland", "lumen"], val_clips=["3"], random_crop={"size": 48, "per_image": 2})
    model_path = train(validate_config(config), tmp_path / "run", stages=("head",))
    meta = read_checkpoint(model_path)["meta"]
    assert meta["classes"] == ["gland", "lumen"] and meta["random_crop"] == {"size": 48, "per_image": 2}
    # 3 training images x 2 crops x 2 views (identity, hflip) + 1 validation image x 2 crops x identity
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3 * 2 * 2 + 2
    model = load_model_from_checkpoint(model_path, "head")
    assert model(torch.rand(1, 3, 40, 50)).shape == (1, 2, 40, 50)
    segmenter = vps.Segmenter(checkpoint=model_path, model="head", device="cpu", precision="fp32")
    assert segmenter.class_names == ("gland", "lumen")
    assert segmenter.predict(np.zeros((3, 40, 50, 3), np.uint8), batch_size=2).shape == (3, 2, 40, 50)

    code, stdout, err = segment(capsys, data, "--stills", "--png-dir", tmp_path / "png", "--model", "head",
                                "--checkpoint", model_path, "--tile", 48, "--quiet")
    assert code == 0, err
    for name in ("gland", "lumen"):
        maps = read_pngs(tmp_path / "png" / name / "glas")
        assert sorted(maps) == ["0", "1", "2", "3"] and all(m.shape == (80, 96) for m in maps.values())
    video = make_video(tmp_path / "clip.mp4", count=2, width=64, height=48)
    code, stdout, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--overlay", "--model", "head",
                                "--checkpoint", model_path, "--quiet")
    assert code == 0, err
    for name in ("m_gland.mp4", "m_lumen.mp4", "m_overlay_gland.mp4", "m_overlay_lumen.mp4"):
        assert (tmp_path / name).is_file(), name
    assert read_mask_video(tmp_path / "m_lumen.mp4").shape == (2, 48, 64)
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--model", "head", "--checkpoint", model_path,
                           "--quiet")
    assert code == 2 and "m_gland.mp4" in err and "--overwrite" in err  # per-class outputs are checked too


@pytest.mark.slow
def test_litemedsam_head_from_vps_train_to_vps_segment(tmp_path, capsys):
    """The real path, nothing patched: vps-train a linear head on the LiteMedSAM embedding, vps-segment with it."""
    from vps.cli.train import main

    data = write_clips(tmp_path / "data", clips=2, frames=2)
    config = head_config(data, tmp_path / "cache", "linear")
    config["model"]["sam"] = {"backend": "litemedsam", "checkpoint": None}
    config["data"]["val_clips"] = ["c1"]
    config["cache"]["views"] = ["identity"]
    config_file = tmp_path / "head.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main([str(config_file), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert read_checkpoint(tmp_path / "run" / "model.pt")["meta"]["sam_backend"] == "litemedsam"
    video = make_video(tmp_path / "clip.mp4", count=1, width=64, height=48)
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--model", "head",
                           "--checkpoint", tmp_path / "run" / "model.pt", "--quiet")
    assert code == 0, err
    assert read_mask_video(tmp_path / "m.mp4").shape == (1, 48, 64)


def test_class_masks_are_read_per_class(tmp_path):
    data = write_classes(tmp_path / "glas", count=2)
    samples = discover_samples(data, ["gland", "lumen"])
    assert [s.mask for s in samples][0] == (data / "masks" / "gland" / "0.png", data / "masks" / "lumen" / "0.png")
    image, mask = read_pair(samples[0])
    assert image.shape == (80, 96, 3) and mask.shape == (2, 80, 96) and mask[0].any() and mask[1].any()
    (data / "masks" / "lumen" / "1.png").unlink()
    with pytest.raises(ValueError, match="1.png"):
        discover_samples(data, ["gland", "lumen"])
    with pytest.raises(ValueError, match="missing: edge"):
        discover_samples(data, ["gland", "edge"])


def test_random_crops_are_seeded_and_inside_the_image(tmp_path):
    data = write_classes(tmp_path / "glas", count=2)
    samples = discover_samples(data, ["gland", "lumen"])
    crops = random_crops(samples, 48, 5, seed=1)
    assert len(crops) == 10 and crops == random_crops(samples, 48, 5, seed=1)
    assert crops != random_crops(samples, 48, 5, seed=2)
    for crop in crops:
        left, top, right, bottom = crop.crop
        assert (right - left, bottom - top) == (48, 48) and 0 <= left and right <= 96 and 0 <= top and bottom <= 80
    image, mask = read_pair(crops[0])
    assert image.shape == (48, 48, 3) and mask.shape == (2, 48, 48)
    assert random_crops(samples, 100, 5) == samples[:1] * 0 + samples  # no larger than the crop: kept, once
    tall = random_crops(samples, 90, 3)
    assert {(c.crop[2] - c.crop[0], c.crop[3] - c.crop[1]) for c in tall} == {(90, 80)}


def test_head_configs_are_validated(tmp_path):
    config = head_config(tmp_path, tmp_path / "cache", "cnn")
    assert validate_config(config)["train_head"]["epochs"] == 1  # no train_g, train_h or prompt_generator needed
    assert training_stages(config) == ("head",)
    with pytest.raises(ConfigError, match="--stage g: this config trains a prompt-free cnn head"):
        training_stages(config, "g")
    broken = {k: v for k, v in config.items() if k != "train_head"}
    with pytest.raises(ConfigError, match="train_head is missing"):
        validate_config(broken)
    with pytest.raises(ConfigError, match="model.head.type must be one of"):
        validate_config({**config, "model": {**config["model"], "head": {"type": "unet"}}})
    with pytest.raises(ConfigError, match="the linear head has no setting hidden_channels"):
        validate_config({**config, "model": {**config["model"], "head": {"type": "linear", "hidden_channels": 8}}})
    autosam = tiny_config(tmp_path, tmp_path / "cache")
    assert training_stages(autosam) == ("g", "h") and training_stages(autosam, "h") == ("h",)
    with pytest.raises(ConfigError, match="data.classes names 2 classes but AutoSAM's g"):
        validate_config({**autosam, "data": {**autosam["data"], "classes": ["a", "b"]}})
    with pytest.raises(ConfigError, match="data.classes must be null or a list of distinct class names"):
        validate_config({**config, "data": {**config["data"], "classes": ["a", "a"]}})
    with pytest.raises(ConfigError, match="data.random_crop.per_image is missing"):
        validate_config({**config, "data": {**config["data"], "random_crop": {"size": 256}}})
    with pytest.raises(ConfigError, match="data.random_crop and data.negatives both cut crops"):
        validate_config({**autosam, "data": {**autosam["data"], "random_crop": {"size": 64, "per_image": 2},
                                             "negatives": {"train_fraction": 0.2}}})


def test_vps_train_cli_trains_a_head_and_refuses_stage_g(tmp_path, capsys):
    from vps.cli.train import main

    data = write_clips(tmp_path / "data", clips=2, frames=2)
    config_file = tmp_path / "head.yaml"
    config_file.write_text(yaml.safe_dump(head_config(data, tmp_path / "cache", "linear")))
    assert main([str(config_file), "--out", str(tmp_path / "run"), "--stage", "g"]) == 2
    assert "use --stage all" in capsys.readouterr().err
    assert main([str(config_file), "--out", str(tmp_path / "run"), "data.val_clips=[c1]"]) == 0
    assert (tmp_path / "run" / "head_last.pt").is_file()
    assert main([str(config_file), "--out", str(tmp_path / "run"), "data.val_clips=[c1]"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "run"), "--resume", "train_head.epochs=2"]) == 0
    assert torch.load(tmp_path / "run" / "head_last.pt", weights_only=True)["epoch"] == 1
