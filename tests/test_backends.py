"""Backends (vps.backends): the exported and compiled paths equal torch eager, the export cache,
``auto``'s choice and fallback, and one-line errors for a backend that cannot run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vps
import vps.backends as backends
from conftest import make_tiny_autosam, make_tiny_light, make_tiny_sam
from vps.backends import BACKEND_CHOICES, BackendError
from vps.cli.segment import build_parser, main

EXPORTED = [pytest.param(name, marks=pytest.mark.skipif(not backends.is_installed(name),
                                                        reason=f"needs the {backends.BACKENDS[name].package} package"))
            for name in ("openvino", "onnx")]
MAKERS = {"autosam": make_tiny_autosam, "light": make_tiny_light}


def frames(count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (count, 48, 40, 3), np.uint8)


def eager_fp32(model: str, images: np.ndarray) -> np.ndarray:
    return vps.Segmenter(model=MAKERS[model](), backend="eager", precision="fp32").predict(images)


@pytest.mark.parametrize("model", ["autosam", "light"])
@pytest.mark.parametrize("backend", EXPORTED)
def test_exported_fp32_equals_eager(backend, model):
    images = frames()
    segmenter = vps.Segmenter(model=MAKERS[model](), backend=backend, precision="fp32", batch_size=2)
    assert (segmenter.backend, segmenter.precision) == (backend, "fp32")
    # 3 frames at batch 2: one full batch, one padded; the stills path too
    assert np.abs(segmenter.predict(images) - eager_fp32(model, images)).max() < 1e-4
    stills = segmenter.predict([images[0], images[1, :30]])
    assert stills[1].shape == (30, 40)


@pytest.mark.skipif(not backends.is_installed("openvino"), reason="needs the openvino package")
def test_openvino_bf16_is_within_the_bf16_tolerance_of_eager_fp32():
    images = frames()
    probabilities = vps.Segmenter(model=make_tiny_autosam(), backend="openvino", precision="bf16").predict(images)
    assert np.abs(probabilities - eager_fp32("autosam", images)).mean() < 0.01


@pytest.mark.slow
def test_torch_compile_equals_eager():
    images = frames(2)
    segmenter = vps.Segmenter(model=make_tiny_light(), backend="compile", precision="fp32")
    assert np.abs(segmenter.predict(images) - eager_fp32("light", images)).max() < 1e-4


@pytest.mark.parametrize("backend", EXPORTED)
def test_the_export_is_cached_by_weights(backend, monkeypatch, tmp_path):
    monkeypatch.setenv("VPS_CACHE_DIR", str(tmp_path))
    vps.Segmenter(model=make_tiny_light(), backend=backend, precision="fp32")
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    vps.Segmenter(model=make_tiny_light(), backend=backend, precision="fp32")  # same weights: from the cache
    with pytest.raises(BackendError, match="failed to build the model: exported again"):
        vps.Segmenter(model=make_tiny_light(seed=1), backend=backend, precision="fp32")  # other weights


def test_weights_hash_follows_the_weights():
    assert backends.weights_hash(make_tiny_light(0)) == backends.weights_hash(make_tiny_light(0))
    assert backends.weights_hash(make_tiny_light(0)) != backends.weights_hash(make_tiny_light(1))


def test_the_box_decoder_is_cached_by_the_decoders_weights_only(tmp_path):
    def sam(encoder_seed, decoder_seed):
        torch.manual_seed(encoder_seed)
        encoder = make_tiny_sam().image_encoder
        torch.manual_seed(decoder_seed)
        model = make_tiny_sam()
        model.image_encoder = encoder
        return model

    path = backends.box_decoder_cache_path
    assert path(sam(0, 0), tmp_path) == path(sam(1, 0), tmp_path)  # another image encoder: the same graph
    assert path(sam(0, 0), tmp_path) != path(sam(0, 1), tmp_path)  # another prompt encoder and mask decoder


def test_auto_takes_the_first_installed_backend(monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER", ("openvino", "eager"))
    monkeypatch.setattr(backends, "is_installed", lambda name: name != "openvino")
    assert vps.Segmenter(model=make_tiny_light()).backend == "eager"
    assert backends.auto_candidates(torch.device("cpu")) == ("eager",)
    monkeypatch.setattr(backends, "is_installed", lambda name: True)
    assert backends.auto_candidates(torch.device("cpu")) == ("openvino", "eager")
    assert backends.auto_candidates(torch.device("cuda")) == ("eager",)


def break_export(monkeypatch, export: str) -> None:
    """OpenVINO first and installed, and its export ``export`` failing with a two-line error."""
    monkeypatch.setattr(backends, "AUTO_ORDER", ("openvino", "eager"))
    monkeypatch.setattr(backends, "is_installed", lambda name: True)

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(backends, export, broken)


def test_auto_falls_back_to_eager_when_a_backend_fails_to_build(monkeypatch):
    break_export(monkeypatch, "export_onnx")
    with pytest.warns(UserWarning, match=r"backend openvino failed to build the model \(unsupported operator\)"):
        segmenter = vps.Segmenter(model=make_tiny_light())
    assert segmenter.backend == "eager"
    with pytest.raises(BackendError, match="--backend openvino failed to build the model: unsupported operator$"):
        vps.Segmenter(model=make_tiny_light(), backend="openvino")


class Doubler(nn.Module):
    """A module of no fixed input size."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1] * 2 - 1


def test_auto_skips_backends_that_need_a_fixed_input_size(monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER", ("openvino", "eager"))
    monkeypatch.setattr(backends, "is_installed", lambda name: True)
    assert vps.Segmenter(model=Doubler()).backend == "eager"
    with pytest.raises(BackendError, match="needs a model whose parts share one input size"):
        vps.Segmenter(model=Doubler(), backend="openvino", precision="fp32")


def test_a_backend_that_is_not_installed_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(backends, "is_installed", lambda name: name != "openvino")
    with pytest.raises(BackendError, match=r"the openvino package is not installed; pip install 'vps\[openvino\]'"):
        vps.Segmenter(model=make_tiny_light(), backend="openvino")
    (tmp_path / "clip").mkdir()
    Image.fromarray(frames(1)[0]).save(tmp_path / "clip" / "0.png")
    code = main([str(tmp_path / "clip"), "--out", str(tmp_path / "m.mp4"), "--backend", "openvino"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "pip install 'vps[openvino]'" in error


def test_precision_follows_what_the_backend_runs(monkeypatch):
    monkeypatch.setattr(backends, "is_installed", lambda name: True)
    cpu = torch.device("cpu")
    assert backends.backend_precision("onnx", "bf16", "auto") == "fp32"  # auto: what ONNX Runtime runs
    assert backends.backend_precision("onnx", "bf16", "bf16") == "bf16"
    with pytest.raises(BackendError, match="--backend onnx runs fp32, not bf16"):
        backends.check_backend("onnx", cpu, "bf16")
    with pytest.raises(BackendError, match="--backend openvino runs on cpu, not cuda"):
        backends.check_backend("openvino", torch.device("cuda"), "bf16")


def test_the_cli_offers_every_backend():
    action = next(a for a in build_parser()._actions if a.dest == "backend")
    assert tuple(action.choices) == BACKEND_CHOICES and action.default == "auto"


# ---- SAM's image encoder for the training's embedding cache ---------------------------------------


def encoder_images(count: int = 3, size: int = 64) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", EXPORTED)
def test_the_exported_image_encoder_equals_sam_encode(backend):
    sam = make_tiny_sam()
    images = encoder_images()
    encode = backends.image_encoder(sam, torch.device("cpu"), backend, "fp32", batch=2)
    assert encode is not sam.encode
    expected = sam.encode(images)
    # 3 images at batch 2: one full batch, one padded
    embeddings = encode(images)
    assert embeddings.shape == expected.shape == (3, *sam.embedding_shape)
    assert (embeddings - expected).abs().max() < 1e-4 * expected.abs().max()
    larger = encoder_images(size=80)  # e.g. a g larger than SAM's input: resized to SAM's, as sam.encode does
    expected = sam.encode(larger)
    assert (encode(larger) - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.skipif(not backends.is_installed("openvino"), reason="needs the openvino package")
def test_the_openvino_bf16_image_encoder_is_within_the_bf16_tolerance_of_fp32():
    sam = make_tiny_sam()
    images = encoder_images()
    expected = sam.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_bf16 = sam.encode(images).float()
    embeddings = backends.image_encoder(sam, torch.device("cpu"), "openvino", "bf16", batch=4)(images)
    bf16_error = (eager_bf16 - expected).abs().mean()
    assert (embeddings - expected).abs().mean() < max(3 * bf16_error, 1e-3 * expected.abs().mean())


def test_the_image_encoder_is_sam_encode_where_auto_finds_no_exported_backend(monkeypatch):
    sam = make_tiny_sam()
    monkeypatch.setattr(backends, "AUTO_ORDER", ("openvino", "eager"))
    monkeypatch.setattr(backends, "is_installed", lambda name: name != "openvino")
    assert backends.image_encoder(sam, torch.device("cpu"), "auto", "bf16", batch=4) == sam.encode
    monkeypatch.setattr(backends, "is_installed", lambda name: True)
    # on CUDA auto is torch (OpenVINO runs on the CPU only)
    assert backends.image_encoder(sam, torch.device("cuda"), "auto", "bf16", batch=4) == sam.encode


def test_the_image_encoder_falls_back_to_eager_or_names_the_config_key(monkeypatch):
    sam = make_tiny_sam()
    break_export(monkeypatch, "export_image_encoder")
    with pytest.warns(UserWarning, match=r"backend openvino failed to build SAM's image encoder \(unsupported operator\)"):
        assert backends.image_encoder(sam, torch.device("cpu"), "auto", "bf16", batch=4) == sam.encode
    option = "runtime.encoder_backend"
    with pytest.raises(BackendError, match=f"^{option} openvino failed to build SAM's image encoder: unsupported operator$"):
        backends.image_encoder(sam, torch.device("cpu"), "openvino", "bf16", batch=4, option=option)
    monkeypatch.setattr(backends, "is_installed", lambda name: name != "openvino")
    with pytest.raises(BackendError, match=rf"^{option} openvino: the openvino package is not installed; "
                                           rf"pip install 'vps\[openvino\]' \(or use {option} eager\)$"):
        backends.image_encoder(sam, torch.device("cpu"), "openvino", "bf16", batch=4, option=option)
