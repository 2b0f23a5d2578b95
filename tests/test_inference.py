"""The batched inference engine against the plain per-frame loop, smoothing, precision checks."""

from __future__ import annotations

import copy

import pytest
import torch

import vps  # noqa: F401
from test_video_io import moving_disc
from vps.inference import (
    ExponentialSmoother, SegmentationEngine, autocast_dtype, fuse_conv_bn, model_input_size, per_frame_loop,
    resolve_device, resolve_precision, threshold_uint8,
)


@pytest.fixture
def frames() -> torch.Tensor:
    return torch.from_numpy(moving_disc(5, 96, 72))


@pytest.mark.parametrize("name", ["tiny_light", "tiny_autosam"])
def test_batched_engine_equals_per_frame_loop(request, frames, name):
    batch_size = 2  # batches of 2 and a last one of 1
    model = request.getfixturevalue(name)
    expected = per_frame_loop(model, frames)
    engine = SegmentationEngine(copy.deepcopy(model), "cpu", "fp32")
    got = torch.cat([engine(frames[i:i + batch_size]) for i in range(0, len(frames), batch_size)])
    assert got.shape == (5, 72, 96) and got.dtype == torch.uint8
    assert (got.int() - expected.int()).abs().max() <= 1


def test_engine_without_optimisations_matches_the_loop(tiny_light, frames):
    # batched convolutions may round differently from single-frame ones (thread-count dependent kernels),
    # so exact equality is not guaranteed; a whole grey level of difference would be a real bug.
    engine = SegmentationEngine(copy.deepcopy(tiny_light), "cpu", "fp32", optimize=False, resize_on_device=False)
    difference = (engine(frames).int() - per_frame_loop(tiny_light, frames).int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.01


def test_cpu_resizes_frames_as_uint8_within_a_level_of_the_float_resize(tiny_light):
    from vps.inference import resize_images

    frames = torch.from_numpy(moving_disc(4, 384, 288))  # real frame size, shrunk to the model's 64
    engine = SegmentationEngine(copy.deepcopy(tiny_light), "cpu", "fp32")
    got = engine.images(frames)
    reference = resize_images(frames.permute(0, 3, 1, 2).float() / 255, engine.input_size)
    assert got.shape == reference.shape == (4, 3, engine.input_size, engine.input_size)
    assert (got - reference).abs().max() <= 1 / 255 + 1e-6


def test_bf16_is_close_to_fp32(tiny_light, frames):
    fp32 = SegmentationEngine(copy.deepcopy(tiny_light), "cpu", "fp32")(frames)
    bf16 = SegmentationEngine(copy.deepcopy(tiny_light), "cpu", "bf16")(frames)
    assert (fp32.int() - bf16.int()).abs().float().mean() < 4


@pytest.mark.parametrize("name", ["tiny_light", "tiny_autosam"])
def test_stills_of_any_size_match_single_frames(request, name):
    # images of different sizes share a batch; each map equals the one-frame video result at its size
    engine = SegmentationEngine(copy.deepcopy(request.getfixturevalue(name)), "cpu", "fp32")
    images = [torch.from_numpy(moving_disc(1, width, height)[0]) for width, height in ((96, 72), (40, 50), (64, 64))]
    maps = engine.stills(images)
    assert [tuple(m.shape) for m in maps] == [(72, 96), (50, 40), (64, 64)]
    for image, got in zip(images, maps):
        assert got.dtype == torch.uint8
        assert (got.int() - engine(image[None])[0].int()).abs().max() <= 1


def test_input_size(tiny_light, tiny_autosam):
    assert model_input_size(tiny_light) == 64
    assert model_input_size(tiny_autosam) == 64  # tiny SAM and tiny g both take 64 x 64
    tiny_autosam.sam.image_size = 128
    assert model_input_size(tiny_autosam) is None


def test_fuse_conv_bn_keeps_tinyvit_outputs():
    from vps.modeling.build_sam import build_litemedsam

    torch.manual_seed(0)
    encoder = build_litemedsam(pretrained=False).image_encoder.eval()
    for module in encoder.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    image = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        before = encoder(image)
        assert fuse_conv_bn(encoder) > 10
        after = encoder(image)
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-3)


def test_smoother():
    assert torch.equal(ExponentialSmoother(0)(torch.ones(3, 2, 2)), torch.ones(3, 2, 2))
    smoother = ExponentialSmoother(3)  # alpha 0.5
    step = torch.tensor([0.0, 1.0, 1.0, 1.0]).view(4, 1, 1)
    assert smoother(step).flatten().tolist() == [0.0, 0.5, 0.75, 0.875]
    # the state carries over batches of the same clip, and reset() forgets it
    assert smoother(torch.ones(1, 1, 1)).item() == 0.9375
    smoother.reset()
    assert smoother(torch.ones(1, 1, 1)).item() == 1.0


def test_precision_and_device_checks():
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    for name in ("gpu", "meta", "cuda:x"):
        with pytest.raises(ValueError, match=f"--device {name}: expected auto, cpu, cuda or cuda:N"):
            resolve_device(name)


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16"}, "bf16"),  # AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later)
    ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # AMX (Intel Sapphire Rapids and later)
    ({"avx512f", "avx2"}, "fp32"),  # bf16 would be emulated: slower than fp32
    (set(), "fp32"),  # no /proc/cpuinfo
])
def test_auto_precision_follows_the_cpu(monkeypatch, flags, expected):
    monkeypatch.setattr("vps.hardware.cpu_flags", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("auto", torch.device("cuda:1")) == "bf16"  # whatever the CPU
    for name in ("fp32", "bf16", "fp16"):  # an explicit --precision always wins
        assert resolve_precision(name, torch.device("cpu")) == name


def test_threshold_uint8_matches_probabilities():
    assert threshold_uint8(0.5) == 128
    p = torch.linspace(0, 1, 10001)
    maps = (p * 255).round()
    # the 8-bit map thresholded at threshold_uint8 differs from p >= 0.5 only within half a level
    disagree = p[(maps >= threshold_uint8(0.5)) != (p >= 0.5)]
    assert disagree.numel() == 0 or (disagree - 0.5).abs().max() < 1 / 255
