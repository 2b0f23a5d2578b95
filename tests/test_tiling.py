"""Tiled inference for large stills: windows cover the image, blending is seamless, one window equals no tiling,
and small objects that the model's fixed input shrinks away are found when tiled."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vps.inference import SegmentationEngine
from vps.tiling import ramp_weights, tile_starts, tiled_logits

pytestmark = pytest.mark.usefixtures("one_thread")


class BlobDetector(nn.Module):
    """A deterministic toy model with a fixed input, like the real ones: it resizes every image to
    ``input_size`` squared, then finds bright objects at least 5 pixels wide there (a morphological opening
    of the thresholded image). Returns B x 1 x input_size x input_size logits (+10 object, -10 background)."""

    def __init__(self, input_size: int = 256) -> None:
        super().__init__()
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)
        bright = (small.mean(1, keepdim=True) > 0.5).float()
        eroded = -F.max_pool2d(-bright, 5, stride=1, padding=2)
        opened = F.max_pool2d(eroded, 5, stride=1, padding=2)
        return 20 * opened - 10


def blob_image(size: int = 1024, radius: float = 6.0, seed: int = 0):
    """A size x size dark image with ~12 px bright discs on a grid with jitter; returns (3 x S x S, centres)."""
    rng = np.random.default_rng(seed)
    centres = [(int(y + rng.integers(-20, 21)), int(x + rng.integers(-20, 21)))
               for y in range(64, size - 40, 128) for x in range(64, size - 40, 128)]
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 0.1, dtype=np.float32)
    for y, x in centres:
        image[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = 0.9
    return torch.from_numpy(image)[None].repeat(3, 1, 1), centres


@pytest.mark.parametrize("length,tile,overlap", [(1000, 256, 64), (1024, 256, 64), (256, 256, 64), (300, 256, 0),
                                                 (257, 256, 64), (90, 256, 64)])
def test_windows_cover_the_image_with_the_overlap(length, tile, overlap):
    side = min(tile, length)
    starts = tile_starts(length, side, overlap)
    assert starts[0] == 0 and starts[-1] + side == length
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert all(a + side - b >= overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap


def test_ramp_weights():
    weights = ramp_weights(8, 10, 3)
    assert weights.shape == (8, 10) and weights.min() > 0 and weights.max() == 1
    assert weights[0, 5] == pytest.approx(0.25) and weights[3, 5] == 1
    assert torch.equal(ramp_weights(4, 4, 0), torch.ones(4, 4))


def test_blending_is_seamless():
    """A model whose answer does not depend on the window gives the same answer everywhere after blending."""
    image = torch.rand(3, 700, 530)
    logits = tiled_logits(lambda x: torch.full((x.shape[0], 2, 64, 64), 3.0), image, tile=256)
    assert logits.shape == (1, 2, 700, 530)
    assert torch.allclose(logits, torch.full_like(logits, 3.0), atol=1e-5)


def test_an_image_the_size_of_one_tile_equals_untiled_inference():
    model = BlobDetector(128)
    image, _ = blob_image(256, radius=12)
    untiled = F.interpolate(model(image[None]), size=(256, 256), mode="bilinear", align_corners=False)
    tiled = tiled_logits(model, image, tile=256)
    assert torch.allclose(tiled, untiled, atol=1e-5)
    assert (untiled > 0).any()  # not trivially empty


@pytest.mark.parametrize("name", ["tiny_light", "tiny_autosam"])
def test_engine_tile_of_the_image_size_equals_untiled(request, name):
    model = request.getfixturevalue(name)
    frame = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8))
    plain = SegmentationEngine(copy.deepcopy(model), "cpu", "fp32").stills([frame])[0]
    tiled = SegmentationEngine(copy.deepcopy(model), "cpu", "fp32", tile=96).stills([frame])[0]
    assert tiled.shape == plain.shape == (72, 96)
    assert (tiled.int() - plain.int()).abs().max() <= 1
    smaller = SegmentationEngine(copy.deepcopy(model), "cpu", "fp32", tile=40).stills([frame])[0]
    assert smaller.shape == (72, 96)


def test_tiling_finds_small_blobs_that_the_fixed_input_loses():
    model = BlobDetector(256)
    image, centres = blob_image(1024, radius=6)
    untiled = F.interpolate(model(image[None]), size=(1024, 1024), mode="bilinear", align_corners=False)[0, 0]
    tiled = tiled_logits(model, image, tile=256)[0, 0]
    found_untiled = sum(bool(untiled[y, x] > 0) for y, x in centres)
    found_tiled = sum(bool(tiled[y, x] > 0) for y, x in centres)
    assert found_untiled == 0  # 12 px shrink to 3 px at the model's 256 input: below the detector's 5 px
    assert found_tiled == len(centres) == 64
    blobs = torch.zeros(1024, 1024, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(1024), torch.arange(1024), indexing="ij")
    for y, x in centres:
        blobs |= (yy - y) ** 2 + (xx - x) ** 2 <= 12 ** 2
    assert not (tiled > 0)[~blobs].any()  # and nothing else
