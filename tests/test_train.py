"""Training: loss goes down, only g (or h) changes, resume, cache, bad data, distributed gloo run."""

from __future__ import annotations

import copy
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_GENERATOR, TINY_VIT
from vps.config import ConfigError, apply_overrides
from vps.modeling import build_sam, read_checkpoint
from vps.train.cache import EmbeddingCache
from vps.train.data import DataError, discover_samples, split_by_group
from vps.train.dataset import SegmentationDataset, fill_cache, missing_embeddings
from vps.train.trainer import dice_bce_loss, train

TINY_SAM = {"backend": "vit_b", "checkpoint": None, "pretrained": False, "image_size": 64, "patch_size": 1,
            "encoder_overrides": TINY_VIT}


def write_clips(root: Path, clips: int = 3, frames: int = 4, size=(48, 40), seed: int = 0) -> Path:
    """Clip layout root/<clip>/{frames,masks}/<n>.png: a bright disc moving over a textured background."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    yy, xx = np.mgrid[:height, :width]
    for clip in range(clips):
        (root / f"c{clip}" / "frames").mkdir(parents=True)
        (root / f"c{clip}" / "masks").mkdir(parents=True)
        for frame in range(frames):
            cx, cy, r = rng.uniform(12, width - 12), rng.uniform(12, height - 12), rng.uniform(6, 10)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
            image = rng.integers(20, 90, size=(height, width, 3)).astype(np.uint8)
            image[mask] = (220, 120, 90)
            Image.fromarray(image).save(root / f"c{clip}" / "frames" / f"{frame + 1}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / f"c{clip}" / "masks" / f"{frame + 1}.png")
    return root


def tiny_config(data_root: Path, cache_dir: Path, epochs: int = 2, cache: bool = True) -> dict:
    return {
        "model": {"sam": dict(TINY_SAM), "prompt_generator": dict(TINY_GENERATOR), "surrogate": {"hidden_channels": 8}},
        "data": {"root": str(data_root), "val_clips": ["c2"], "val_fraction": 0.0, "split_seed": 0, "mask_size": 256},
        "augment": {"hflip": True, "vflip": True, "rotate": 0, "scale": None, "color_jitter": None},
        "cache": {"enabled": cache, "dir": str(cache_dir), "views": ["identity", "hflip"],
                  "derived_views": []},
        "train_g": {"epochs": epochs, "batch_size": 4, "lr": 3e-3, "weight_decay": 1e-5},
        "train_h": {"epochs": epochs, "batch_size": 4, "lr": 3e-3, "weight_decay": 1e-5},
        "runtime": {"device": "cpu", "precision": "fp32", "num_workers": 0, "seed": 0},
    }


def test_loss_is_bce_plus_dice():
    logits = torch.tensor([[[[10.0, -10.0]]]])
    perfect = torch.tensor([[[[1.0, 0.0]]]])
    assert dice_bce_loss(logits, perfect).item() < 1e-3
    assert dice_bce_loss(-logits, perfect).item() > 5


def test_training_steps_lower_the_loss_and_change_only_g(tmp_path):
    from vps.modeling import AutoSAM, build_prompt_generator
    from vps.modeling.build_sam import build_sam_vit

    data = write_clips(tmp_path / "data")
    dataset = SegmentationDataset(discover_samples(data), image_size=64, mask_size=256)
    batch = {k: torch.stack([dataset[i][k] for i in range(8)]) for k in ("image", "mask")}
    torch.manual_seed(0)
    sam = build_sam_vit("vit_b", image_size=64, patch_size=1, encoder_overrides=TINY_VIT)
    model = AutoSAM(sam, build_prompt_generator(TINY_GENERATOR, pretrained_backbone=False))
    sam_before = copy.deepcopy(sam.state_dict())
    g_before = copy.deepcopy(model.prompt_generator.state_dict())
    optimizer = torch.optim.Adam(model.prompt_generator.parameters(), lr=1e-2)
    model.train()
    assert not sam.training  # SAM stays in eval mode while g trains
    embeddings = sam.encode(batch["image"])
    losses = []
    for _ in range(15):
        loss = dice_bce_loss(model.low_res_logits(batch["image"], embeddings), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # the random tiny SAM decoder responds weakly to the prompt, so the drop is steady but small
    assert losses[-1] < losses[0] - 0.05
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 12
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in sam_before.items())
    changed = [k for k, v in model.prompt_generator.state_dict().items() if not torch.equal(v, g_before[k])]
    assert any("decoder" in k for k in changed) and any("backbone" in k for k in changed)


def test_cache_returns_the_fresh_encoder_embedding(tmp_path):
    data = write_clips(tmp_path / "data", clips=1, frames=2)
    sam = build_sam(**{k: v for k, v in TINY_SAM.items() if k != "checkpoint"})
    cache = EmbeddingCache(tmp_path / "cache", "tiny")
    dataset = SegmentationDataset(discover_samples(data), 64, 256, cache, ["identity", "hflip"])
    todo = missing_embeddings(dataset, ["identity", "hflip"])
    assert fill_cache(dataset, sam.encode, todo, torch.device("cpu"), progress=False) == 4
    assert missing_embeddings(dataset, ["identity", "hflip"]) == []
    key, image, _ = dataset.load(1)
    fresh = sam.encode(image.flip(-1)[None])[0]
    cached = cache.get(key, "hflip").float()
    assert torch.allclose(cached, fresh, atol=2e-3 * fresh.abs().max().item())
    assert not torch.allclose(cached, cache.get(key, "identity").float())


def test_the_cache_is_filled_by_the_configured_encoder_only_where_embeddings_are_missing(tmp_path, monkeypatch):
    from vps.train import trainer

    data = write_clips(tmp_path / "data", frames=2)
    built = []
    real_image_encoder = trainer.image_encoder

    def spy(sam, device, backend, *args, **kwargs):
        built.append(backend)
        return real_image_encoder(sam, device, backend, *args, **kwargs)

    monkeypatch.setattr(trainer, "image_encoder", spy)
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["runtime"]["encoder_backend"] = "eager"
    train(config, tmp_path / "first", stages=("g",))
    assert built == ["eager"]
    # training clips c0 and c1 (4 frames) in the identity and hflip views, validation clip c2 (2 frames) as it is
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4 * 2 + 2
    train(config, tmp_path / "second", stages=("g",))
    assert built == ["eager"]  # every embedding was cached: no encoder built, no export


def spy_on_the_encoder(monkeypatch):
    """(built, encoded): the (backend, batch) of every SAM encoder the trainer builds, and the size of every batch
    they encode."""
    from vps.train import trainer

    built, encoded = [], []
    real_image_encoder = trainer.image_encoder

    def spy(sam, device, backend, precision, batch, *args, **kwargs):
        built.append((backend, batch))
        encode = real_image_encoder(sam, device, backend, precision, batch, *args, **kwargs)

        def counted(images):
            encoded.append(len(images))
            return encode(images)
        return counted

    monkeypatch.setattr(trainer, "image_encoder", spy)
    return built, encoded


def test_without_the_cache_every_batch_is_encoded_by_the_configured_encoder_built_once(tmp_path, monkeypatch):
    data = write_clips(tmp_path / "data", frames=2)
    built, encoded = spy_on_the_encoder(monkeypatch)
    config = tiny_config(data, tmp_path / "cache", epochs=2, cache=False)
    config["runtime"]["encoder_backend"] = "eager"
    train(config, tmp_path / "run", stages=("g",))
    assert built == [("eager", 4)]  # built once, for the training batch, and reused by validation
    # 2 epochs of the 4 training frames (clips c0 and c1) and the 2 validation frames (clip c2)
    assert sum(encoded) == 2 * (4 + 2)
    assert not (tmp_path / "cache").exists()


def test_derived_views_transform_the_cached_identity_embedding_with_the_image_and_mask(tmp_path):
    data = write_clips(tmp_path / "data", clips=1, frames=1)
    sam = build_sam(**{k: v for k, v in TINY_SAM.items() if k != "checkpoint"})
    cache = EmbeddingCache(tmp_path / "cache", "tiny")
    dataset = SegmentationDataset(discover_samples(data), 64, 256, cache, ["identity"], derived_views=["rot90"])
    assert dataset.cached_views == ["identity"]  # the derived view's source, no rot90 entry
    assert fill_cache(dataset, sam.encode, missing_embeddings(dataset, dataset.cached_views), torch.device("cpu"),
                      progress=False) == 1
    key, image, mask = dataset.load(0)
    identity = cache.get(key, "identity")
    seen = set()
    for seed in range(12):
        random.seed(seed)
        item = dataset[0]
        turned = not torch.equal(item["image"], image)
        seen.add(turned)
        turn = (lambda x: x.rot90(1, (-2, -1))) if turned else (lambda x: x)
        assert torch.equal(item["image"], turn(image)) and torch.equal(item["mask"], turn(mask))
        assert torch.equal(item["embedding"], turn(identity))
    assert seen == {False, True}  # both the cached view and the derived one were drawn


def test_training_with_derived_views_encodes_only_the_identity_view(tmp_path):
    data = write_clips(tmp_path / "data")
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["cache"].update(views=["hflip"], derived_views=["vflip", "rot180"])
    assert train(config, tmp_path / "run", stages=("g",)).is_file()
    cached_views = {path.parent.parent.name for path in (tmp_path / "cache").rglob("*.npy")}
    assert cached_views == {"identity", "hflip"}  # the derived views' source, and the cached view


def test_cache_validation_caches_only_the_validation_embeddings_and_trains_on_fresh_ones(tmp_path, monkeypatch):
    data = write_clips(tmp_path / "data", frames=2)
    _, encoded = spy_on_the_encoder(monkeypatch)
    config = tiny_config(data, tmp_path / "cache", epochs=2, cache=False)
    config["cache"]["validation"] = True
    config["runtime"]["encoder_backend"] = "eager"
    train(config, tmp_path / "run", stages=("g",))
    # the 2 validation frames (clip c2) encoded once into the cache, the 4 training frames at each of 2 epochs
    assert sum(encoded) == 2 + 2 * 4
    assert len([p for p in (tmp_path / "cache").rglob("*") if p.is_file()]) == 2
    encoded.clear()
    train(config, tmp_path / "run2", stages=("g",))  # a second run finds the validation embeddings cached
    assert sum(encoded) == 2 * 4


@pytest.mark.parametrize("decay, follows", [(1e-6, "last"), (1 - 1e-6, "start")])
def test_ema_decay_saves_the_moving_average_of_the_weights(tmp_path, monkeypatch, decay, follows):
    from vps.train import trainer

    built = []
    real_build = trainer.build_prompt_generator

    def spy(*args, **kwargs):
        generator = real_build(*args, **kwargs)
        built.append({k: v.clone() for k, v in generator.state_dict().items()})
        return generator

    monkeypatch.setattr(trainer, "build_prompt_generator", spy)
    data = write_clips(tmp_path / "data")
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["train_g"]["ema_decay"] = decay
    model_path = train(config, tmp_path / "run", stages=("g",))
    start, saved = built[0], read_checkpoint(model_path)["prompt_generator"]
    state = torch.load(tmp_path / "run" / "g_last.pt", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in state["averaged"].items() if k.startswith("module.")}
    last = state["module"]
    floats = [k for k, v in last.items() if v.is_floating_point()]
    assert all(torch.equal(saved[k], averaged[k]) for k in floats)  # the model file holds the average
    reference, other = (last, start) if follows == "last" else (start, last)
    assert all(torch.allclose(saved[k], reference[k], atol=1e-4) for k in floats)
    assert not all(torch.allclose(saved[k], other[k], atol=1e-4) for k in floats)


def test_a_resumed_run_continues_the_moving_average(tmp_path):
    data = write_clips(tmp_path / "data")
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["train_g"]["ema_decay"] = 0.9
    train(config, tmp_path / "run", stages=("g",))
    first = torch.load(tmp_path / "run" / "g_last.pt", weights_only=True)["averaged"]
    config["train_g"]["epochs"] = 2
    train(config, tmp_path / "run", stages=("g",), resume=True)
    second = torch.load(tmp_path / "run" / "g_last.pt", weights_only=True)["averaged"]
    # 8 training frames (clips c0, c1) at batch 4: two steps per epoch; the average holds the start and every step
    assert first["n_averaged"].item() == 1 + 2 and second["n_averaged"].item() == 1 + 2 + 2
    assert any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())


def test_train_writes_checkpoints_logs_and_resumes(tmp_path):
    data = write_clips(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny_config(data, tmp_path / "cache", epochs=2)
    model_path = train(config, out, stages=("g",))
    assert (out / "config.yaml").is_file() and (out / "log_g.png").is_file()
    assert len((out / "log_g.csv").read_text().strip().splitlines()) == 1 + 2
    state = torch.load(out / "g_last.pt", weights_only=True)
    assert state["epoch"] == 1
    # resume with more epochs: continues at epoch 3 with the saved optimiser state
    saved_steps = state["optimizer"]["state"][0]["step"].item()
    config["train_g"]["epochs"] = 3
    train(config, out, stages=("g",), resume=True)
    resumed = torch.load(out / "g_last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["optimizer"]["state"][0]["step"].item() == saved_steps * 3 / 2
    assert [r.split(",")[0] for r in (out / "log_g.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
    # stage 2 trains h on the fixed g and leaves g as it was
    g_weights = read_checkpoint(model_path)["prompt_generator"]
    train(config, out, stages=("h",))
    payload = read_checkpoint(model_path)
    assert "surrogate" in payload and payload["meta"]["surrogate"] == {"hidden_channels": 8}
    assert all(torch.equal(v, payload["prompt_generator"][k]) for k, v in g_weights.items())


def test_train_without_cache(tmp_path):
    data = write_clips(tmp_path / "data", clips=2, frames=3)
    config = tiny_config(data, tmp_path / "cache", epochs=1, cache=False)
    config["data"]["val_clips"] = ["c1"]
    train(config, tmp_path / "run", stages=("g",))
    assert not (tmp_path / "cache").exists()


def test_split_is_by_clip(tmp_path):
    samples = discover_samples(write_clips(tmp_path / "data", clips=5, frames=3))
    train_set, val_set = split_by_group(samples, val_fraction=0.4, seed=1)
    assert {s.group for s in train_set}.isdisjoint({s.group for s in val_set})
    assert len({s.group for s in val_set}) == 2 and len(val_set) == 6


def test_bad_data_errors_name_the_files(tmp_path):
    data = write_clips(tmp_path / "data", clips=1, frames=2)
    (data / "c0" / "masks" / "2.png").unlink()
    with pytest.raises(DataError, match="2.png"):
        discover_samples(data)
    stills = tmp_path / "stills"
    (stills / "images").mkdir(parents=True)
    (stills / "masks").mkdir()
    Image.new("RGB", (10, 8)).save(stills / "images" / "a.png")
    Image.new("L", (12, 8)).save(stills / "masks" / "a.png")
    from vps.train.data import check_samples

    with pytest.raises(DataError, match="a.png.*10x8.*12x8"):
        check_samples(discover_samples(stills))
    (stills / "masks" / "a.png").write_text("not an image")
    with pytest.raises(DataError, match="cannot read"):
        check_samples(discover_samples(stills))
    with pytest.raises(DataError, match="not a known data layout"):
        discover_samples(tmp_path / "stills" / "images")


def test_overrides_reject_unknown_keys():
    config = {"train_g": {"epochs": 200}}
    assert apply_overrides(config, ["train_g.epochs=3"])["train_g"]["epochs"] == 3
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(config, ["train_g.epoch=3"])
    # a setting the trainer reads may be added where the file leaves it to its default
    config = {"runtime": {"device": "cpu"}}
    assert apply_overrides(config, ["runtime.encoder_backend=eager"])["runtime"]["encoder_backend"] == "eager"
    with pytest.raises(ConfigError, match="unknown key 'runtime.encoder' "):
        apply_overrides(config, ["runtime.encoder=eager"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    data = write_clips(tmp_path / "data")
    config_path = tmp_path / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "cache", epochs=1)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "vps.cli.train", str(config_path), "--out", str(tmp_path / "run"), "--stage", "all"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained model" in result.stdout
    payload = read_checkpoint(tmp_path / "run" / "model.pt")
    assert "surrogate" in payload


def test_init_from_starts_g_and_h_from_a_trained_model(tmp_path):
    data = write_clips(tmp_path / "data")
    trained = train(tiny_config(data, tmp_path / "cache", epochs=1), tmp_path / "first")
    start = read_checkpoint(trained)
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["model"]["init_from"] = str(trained)
    for stage in ("train_g", "train_h"):
        config[stage]["lr"] = 1e-9  # one epoch moves nothing measurable: the weights show where training began
    state = {}
    for name in ("g", "h"):
        train(config, tmp_path / "tuned", stages=(name,))
        state[name] = torch.load(tmp_path / "tuned" / f"{name}_last.pt", weights_only=True)["module"]
    for name, key in (("g", "prompt_generator"), ("h", "surrogate")):
        # weights only: batch-norm running statistics move with every forward pass in training mode
        assert all(torch.allclose(v, start[key][k], atol=1e-6) for k, v in state[name].items() if v.is_floating_point() and "running_" not in k)
    del config["model"]["init_from"]  # the same near-zero step from a new g: far from the trained weights
    train(config, tmp_path / "untrained", stages=("g",))
    untrained = torch.load(tmp_path / "untrained" / "g_last.pt", weights_only=True)["module"]
    assert not all(torch.allclose(v, start["prompt_generator"][k], atol=1e-3) for k, v in untrained.items()
                   if v.is_floating_point() and "running_" not in k)
    assert read_checkpoint(tmp_path / "tuned" / "model.pt")["meta"]["init_from"] == str(trained)


def test_a_fine_tune_that_only_gets_worse_keeps_the_starting_model(tmp_path, monkeypatch, capsys):
    import vps.train.trainer as trainer

    data = write_clips(tmp_path / "data")
    trained = train(tiny_config(data, tmp_path / "cache", epochs=1), tmp_path / "first", stages=("g",))
    start = read_checkpoint(trained)["prompt_generator"]
    scores = iter([0.9, 0.2, 0.3])  # before training, then after each epoch: never better than the start
    real_evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda *args: (real_evaluate(*args)[0], next(scores), {}))
    config = tiny_config(data, tmp_path / "cache", epochs=2)
    config["model"]["init_from"] = str(trained)
    train(config, tmp_path / "tuned", stages=("g",))
    assert "g before training (model.init_from): validation Dice 0.9000" in capsys.readouterr().out
    log = (tmp_path / "tuned" / "log_g.csv").read_text().splitlines()
    assert [(r.split(",")[0], r.split(",")[4]) for r in log[1:]] == [("0", "0.9"), ("1", "0.2"), ("2", "0.3")]
    kept = read_checkpoint(tmp_path / "tuned" / "model.pt")["prompt_generator"]
    moved = torch.load(tmp_path / "tuned" / "g_last.pt", weights_only=True)["module"]
    assert all(torch.equal(v, start[k]) for k, v in kept.items())
    assert not all(torch.equal(v, start[k]) for k, v in moved.items())
    # the exported header says the starting model won: epoch 0 of the 2 trained
    monkeypatch.setattr(sys, "argv", ["export_model.py", str(tmp_path / "tuned"), str(tmp_path / "shipped.pt")])
    _script("export_model").main()
    assert read_checkpoint(tmp_path / "shipped.pt")["meta"]["stage_g"] == {"epochs": 2, "best_epoch": 0,
                                                                          "best_val_dice": 0.9}


def _script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interpolating_a_fine_tune_scores_the_ends_as_the_runs_did(tmp_path, capsys):
    interpolate_weights = _script("interpolate_weights")
    data = write_clips(tmp_path / "data")
    start = train(tiny_config(data, tmp_path / "cache", epochs=1), tmp_path / "first", stages=("g",))
    capsys.readouterr()
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["model"]["init_from"] = str(start)
    config["train_g"]["lr"] = 3e-2
    tuned_run = tmp_path / "tuned"
    train(config, tuned_run, stages=("g",))
    log = capsys.readouterr().out
    start_score = float(log.split("g before training (model.init_from): validation Dice ")[1].split()[0])
    tuned_score = float(log.split("g epoch 1/1: ")[1].split("validation Dice ")[1].split(",")[0])
    out = tmp_path / "mixed" / "model.pt"
    assert interpolate_weights.main(["--run", str(tuned_run), "--alphas", "0", "0.5", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = {line.split()[1].rstrip(":"): float(line.split("validation score ")[1].split()[0])
              for line in printed.splitlines() if line.startswith("alpha ")}
    assert scores["0.00"] == pytest.approx(start_score, abs=1e-4)
    # the run's model.pt holds its best g: the tuned one, or the start when tuning only made it worse
    assert scores["1.00"] == pytest.approx(max(tuned_score, start_score), abs=1e-4)
    mixed = read_checkpoint(out)
    chosen = mixed["meta"]["interpolated"]["alpha"]
    assert scores[f"{chosen:.2f}"] == max(scores.values())
    half = interpolate_weights.interpolate(read_checkpoint(start)["prompt_generator"],
                                           read_checkpoint(tuned_run / "model.pt")["prompt_generator"], 0.5)
    key = next(k for k, v in half.items() if v.is_floating_point() and "running_" not in k)
    ends = read_checkpoint(start)["prompt_generator"][key], read_checkpoint(tuned_run / "model.pt")["prompt_generator"][key]
    assert torch.allclose(half[key], (ends[0] + ends[1]) / 2, atol=1e-6)
    # never overwrites: a second run with the same --out is refused in one line
    assert interpolate_weights.main(["--run", str(tuned_run), "--out", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err


def test_g_larger_than_sam_sees_images_at_its_own_size(tmp_path, monkeypatch):
    """g's input (here 96) above SAM's (64), fine-tuned from a g trained at 64: g gets 96-pixel images in both
    stages, never 64 upsampled, with the cache on (g stage) and the whole geometric recipe off the cache (h stage)."""
    from vps.modeling.prompt_generator import PromptGenerator

    data = write_clips(tmp_path / "data", clips=2, frames=3, size=(120, 100))
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["data"]["val_clips"] = ["c1"]
    start = train(config, tmp_path / "at64", stages=("g",))
    config["model"]["init_from"] = str(start)  # the weights do not depend on the input size
    config["model"]["prompt_generator"]["input_size"] = 96
    config["augment"].update({"rotate": 30, "scale": [0.8, 1.2]})
    seen_by_g = set()
    g_forward = PromptGenerator.forward
    monkeypatch.setattr(PromptGenerator, "forward",
                        lambda self, images: seen_by_g.add(tuple(images.shape[-2:])) or g_forward(self, images))
    model_path = train(config, tmp_path / "run")
    assert seen_by_g == {(96, 96)}
    assert read_checkpoint(model_path)["meta"]["prompt_generator"]["input_size"] == 96


def test_augmenting_a_batch_on_the_device_draws_what_the_loader_workers_would(tmp_path):
    from vps.train.augment import BatchAugment, build_geometric, build_photometric

    samples = discover_samples(write_clips(tmp_path / "data", clips=1, frames=3))
    recipe = {"hflip": True, "vflip": True, "rotate": 90, "scale": [0.75, 1.25],
              "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}}
    geometric, photometric = build_geometric(recipe), build_photometric(recipe)
    in_workers = SegmentationDataset(samples, 64, 32, photometric=photometric, geometric=geometric)
    plain = SegmentationDataset(samples, 64, 32)
    torch.manual_seed(3)
    expected = [in_workers[i] for i in range(len(samples))]
    images = torch.stack([plain[i]["image"] for i in range(len(samples))])
    masks = torch.stack([plain[i]["mask"] for i in range(len(samples))])
    torch.manual_seed(3)
    augmented_images, augmented_masks = BatchAugment(geometric, photometric)(images, masks)
    assert augmented_images.shape == images.shape and augmented_masks.shape == masks.shape
    for i, item in enumerate(expected):
        torch.testing.assert_close(augmented_images[i], item["image"])
        torch.testing.assert_close(augmented_masks[i], item["mask"])
    assert not torch.equal(augmented_images, images)  # the recipe did change the batch


def test_runtime_augment_on_device_trains_and_leaves_the_loader_items_plain(tmp_path, monkeypatch):
    from vps.train import trainer

    data = write_clips(tmp_path / "data", clips=2, frames=3)
    config = tiny_config(data, tmp_path / "cache", epochs=1, cache=False)
    config["data"]["val_clips"] = ["c1"]
    config["runtime"]["augment_on"] = "device"
    augmented_batches = []
    original = trainer.BatchAugment.__call__

    def spy(self, images, masks):
        augmented_batches.append(len(images))
        return original(self, images, masks)

    monkeypatch.setattr(trainer.BatchAugment, "__call__", spy)
    train(config, tmp_path / "run")
    assert sum(augmented_batches) == 2 * 3  # one epoch of g and one of h over clip c0's three frames
    assert trainer.augments_on_device("auto", torch.device("cuda"), num_workers=0)
    assert not trainer.augments_on_device("auto", torch.device("cuda"), num_workers=2)
    assert not trainer.augments_on_device("auto", torch.device("cpu"), num_workers=0)
    assert trainer.augments_on_device("device", torch.device("cpu"), num_workers=2)
    with pytest.raises(ConfigError, match="runtime.augment_on must be one of auto|loader|device"):
        from vps.config import validate_config
        validate_config(apply_overrides(config, ["runtime.augment_on=gpu"]))


def test_cached_embeddings_reach_sams_decoder_in_float32_under_bf16_autocast(tmp_path, monkeypatch):
    # the decoder keeps embedding + prompt in the embedding's dtype; bfloat16 there slowed training (MODEL_CARD.md)
    from vps.modeling.sam import FrozenSam

    seen = []
    real_decode = FrozenSam.decode

    def spy(self, image_embeddings, dense_prompt):
        seen.append(image_embeddings.dtype)
        return real_decode(self, image_embeddings, dense_prompt)

    monkeypatch.setattr(FrozenSam, "decode", spy)
    data = write_clips(tmp_path / "data")
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["runtime"]["precision"] = "bf16"
    train(config, tmp_path / "run", stages=("g",))
    assert seen and set(seen) == {torch.float32}


def test_schedule_by_step_sets_the_rate_at_every_batch(tmp_path):
    data = write_clips(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny_config(data, tmp_path / "cache", epochs=2)
    config["train_g"].update(schedule="cosine", warmup_epochs=1, min_lr=0.0, schedule_by="step", lr=1e-3)
    train(config, out, stages=("g",))
    rows = [r.split(",") for r in (out / "log_g.csv").read_text().strip().splitlines()[1:]]
    first, second = float(rows[0][1]), float(rows[1][1])
    assert 0 < first < 1e-3 and second == pytest.approx(1e-3)  # warm-up from the first batch; its end at epoch 2
    last = torch.load(out / "g_last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert 0 < last < 1e-3  # the last batch's rate, on the way down to min_lr


def test_max_minutes_fits_the_epochs_after_the_first_and_a_resume_keeps_the_fit(tmp_path, capsys):
    data = write_clips(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny_config(data, tmp_path / "cache", epochs=5)
    config["train_g"].update(max_minutes=1e-6, schedule="cosine", min_lr=0.0)
    train(config, out, stages=("g",))
    assert "g: 1 epochs fit in train_g.max_minutes=1e-06" in capsys.readouterr().out
    rows = (out / "log_g.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 1
    assert torch.load(out / "g_last.pt", weights_only=True)["fitted_epochs"] == 1
    train(config, out, stages=("g",), resume=True)
    assert "stage g already finished its 1 epochs" in capsys.readouterr().out
    # a budget the run fits in changes nothing: all the epochs, the cosine curve ending at the last
    config["train_g"]["max_minutes"] = 60
    train(config, tmp_path / "roomy", stages=("g",))
    lrs = [float(r.split(",")[1]) for r in (tmp_path / "roomy" / "log_g.csv").read_text().splitlines()[1:]]
    assert len(lrs) == 5 and lrs[-1] == 0.0
