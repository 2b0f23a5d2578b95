"""The built-in default model ships inside the package, loads offline, and finds polyps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vps  # noqa: F401
from vps.modeling import default_checkpoint_path, load_model_from_checkpoint, read_checkpoint

SHARED_CLIPS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cvc-clinicdb-video"


def test_builtin_checkpoint_is_packaged_with_its_metadata():
    path = default_checkpoint_path()
    assert path.is_file() and path.parent.name == "weights"
    payload = read_checkpoint(path)
    meta = payload["meta"]
    assert meta["sam_backend"] == "litemedsam"
    assert meta["prompt_generator"]["backbone"] == "tf_efficientnet_lite0"
    assert "surrogate" in payload and meta["val_clips"]
    assert all(v.dtype == torch.float16 for v in payload["prompt_generator"].values() if v.is_floating_point())


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_CLIPS.is_dir(), reason="needs ../shared/data/cvc-clinicdb-video")
def test_builtin_light_model_finds_the_polyp_on_a_validation_frame():
    meta = read_checkpoint(default_checkpoint_path())["meta"]
    clip = SHARED_CLIPS / meta["val_clips"][0]
    frame_path = sorted((clip / "frames").glob("*.png"))[len(list((clip / "frames").glob("*.png"))) // 2]
    image = np.asarray(Image.open(frame_path).convert("RGB"))
    truth = np.asarray(Image.open(clip / "masks" / frame_path.name).convert("L")) > 128
    model = load_model_from_checkpoint(default_checkpoint_path(), "light")
    with torch.no_grad():
        logits = model(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255)
    predicted = logits[0, 0].numpy() > 0
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert dice > 0.6, f"Dice {dice:.3f} on {frame_path}"
