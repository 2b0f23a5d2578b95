"""Shared test fixtures: small models with random weights, built through the real builders."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import torch

import vps  # noqa: F401  (applies the torchvision compatibility fix before timm/segment_anything load)
import vps.backends
from vps.modeling import AutoSAM, LightModel, build_prompt_generator, build_surrogate, checkpoint_metadata, save_checkpoint
from vps.modeling.build_sam import build_sam_vit

TINY_GENERATOR = {"backbone": "tf_efficientnet_lite0", "backbone_weights": None, "input_size": 64,
                  "out_indices": [1, 2, 3, 4], "decoder_channels": [32, 24, 16]}
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 8}


@pytest.fixture
def eval_workers_for_few_frames(monkeypatch):
    """vps-eval starts its worker processes even for a few frames (small jobs normally run in one)."""
    import eval.protocol

    monkeypatch.setattr(eval.protocol, "FRAMES_PER_PROCESS", 1)


def make_tiny_sam(backend: str = "vit_b"):
    """A SAM ViT of the given family with the official code path but a tiny random encoder (64 x 64 input)."""
    return build_sam_vit(backend, image_size=64, patch_size=1, encoder_overrides=TINY_VIT)


def make_tiny_autosam(seed: int = 0) -> AutoSAM:
    torch.manual_seed(seed)
    return AutoSAM(make_tiny_sam(), build_prompt_generator(TINY_GENERATOR, pretrained_backbone=False)).eval()


def make_tiny_light(seed: int = 0) -> LightModel:
    torch.manual_seed(seed)
    return LightModel(build_prompt_generator(TINY_GENERATOR, pretrained_backbone=False), build_surrogate()).eval()


def save_random_checkpoint(path: Path, sam_backend: str = "litemedsam", seed: int = 0) -> Path:
    """A g + h checkpoint with random weights and the tiny generator config (fast on CPU)."""
    light = make_tiny_light(seed)
    meta = checkpoint_metadata(TINY_GENERATOR, sam_backend, {"hidden_channels": 64})
    return save_checkpoint(path, meta, light.prompt_generator, light.surrogate)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a small shared
    CPU, two threads make these small models many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory) -> Path:
    """Exported models (vps.backends) go to a temporary folder, shared by the session, never ~/.cache."""
    folder = tmp_path_factory.mktemp("vps-cache")
    saved = os.environ.get("VPS_CACHE_DIR")
    os.environ["VPS_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("VPS_CACHE_DIR", None)
    else:
        os.environ["VPS_CACHE_DIR"] = saved


@pytest.fixture(scope="session", autouse=True)
def eager_by_default():
    """``auto`` means torch eager in-process: exporting to OpenVINO for every small Segmenter would triple
    the suite's time. tests/test_backends.py tests the other backends and ``auto``'s order itself."""
    with mock.patch.object(vps.backends, "AUTO_ORDER", ("eager",)):
        yield


@pytest.fixture
def tiny_autosam() -> AutoSAM:
    return make_tiny_autosam()


@pytest.fixture
def tiny_light() -> LightModel:
    return make_tiny_light()


@pytest.fixture
def random_checkpoint(tmp_path) -> Path:
    return save_random_checkpoint(tmp_path / "random_g_h.pt")
