"""SAM prompts built from a known mask (the AutoSAM paper's SAM baselines): points, box, mask prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_autosam

from vps.modeling.prompts import (
    MASK_PROMPT_LOGIT,
    SAM_PROMPT_BASELINES,
    box_from_mask,
    boxes_from_mask,
    mask_prompt_from_mask,
    pad_points,
    points_from_mask,
    prompted_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def two_objects(height: int = 120, width: int = 200) -> np.ndarray:
    """A C-shaped object (its centroid lies outside it) and a small square."""
    mask = np.zeros((height, width), dtype=bool)
    yy, xx = np.mgrid[:height, :width]
    ring = (np.hypot(yy - 60, xx - 60) < 45) & (np.hypot(yy - 60, xx - 60) > 25)
    mask |= ring & ~((xx > 60) & (abs(yy - 60) < 20))  # open on the right
    mask[20:32, 150:162] = True
    return mask


def to_pixel(point: torch.Tensor, size: int, shape) -> tuple:
    x, y = point.tolist()
    return int(round(y * shape[0] / size)), int(round(x * shape[1] / size))


def test_points_lie_inside_each_component_far_from_its_boundary():
    mask = two_objects()
    points = points_from_mask(mask, size=256)
    assert points.shape == (2, 2)
    for point in points:
        row, col = to_pixel(point, 256, mask.shape)
        assert mask[row, col]
        assert mask[row - 4:row + 5, col - 4:col + 5].all()  # interior: well away from the boundary
    centroid = np.argwhere(mask & (np.arange(200)[None] < 120)).mean(0).round().astype(int)
    assert not mask[tuple(centroid)]  # the C's centroid is outside it: a centroid would have been wrong
    one = points_from_mask(mask, size=256, per_component=False)
    assert one.shape == (1, 2)
    row, col = to_pixel(one[0], 256, mask.shape)
    assert mask[row, col] and col < 120  # the deepest point: in the C (20 px wide), not the 12 px square
    assert points_from_mask(np.zeros((8, 8), bool), 256).shape == (0, 2)


def test_pad_points_marks_padding_with_sams_label():
    coords, labels = pad_points([torch.ones(3, 2), torch.zeros(0, 2), torch.full((1, 2), 5.0)])
    assert coords.shape == (3, 3, 2) and labels.tolist() == [[1, 1, 1], [-1, -1, -1], [1, -1, -1]]
    assert coords[2, 0].tolist() == [5.0, 5.0]


def test_one_box_per_component():
    boxes = boxes_from_mask(two_objects(), 200)  # a 200 x 120 mask in a 200 x 200 frame: y scaled by 200 / 120
    assert boxes.shape == (2, 4)
    assert boxes[1].tolist() == pytest.approx([150, 20 * 200 / 120, 162, 32 * 200 / 120])
    assert boxes_from_mask(np.zeros((5, 5), bool), 256).shape == (0, 4)


def test_per_component_prompts_are_decoded_one_by_one_and_united(tiny_autosam):
    """gt_points equals the maximum of SAM's answers to each component's point alone."""
    sam = tiny_autosam.sam
    mask = np.zeros((64, 64), bool)
    mask[5:15, 5:15], mask[30:50, 40:60] = True, True
    with torch.no_grad():
        embeddings = sam.encode(torch.rand(1, 3, 64, 64))
        united = prompted_logits(sam, embeddings, "gt_points", [mask])
        points = points_from_mask(mask, sam.image_size)
        alone = [sam.decode_with_prompts(embeddings, points=(p[None, None], torch.ones(1, 1, dtype=torch.int64)))
                 for p in points]
        empty = prompted_logits(sam, embeddings, "gt_boxes", [np.zeros((64, 64), bool)])
    assert len(alone) == 2
    assert torch.allclose(united, torch.maximum(*alone), atol=1e-5)
    assert (empty < 0).all()  # no object, no prompt: nothing segmented


def test_box_and_mask_prompt_from_a_known_mask():
    mask = np.zeros((100, 50), dtype=bool)
    mask[10:30, 5:25] = True
    assert box_from_mask(mask, 256).tolist() == pytest.approx([5 * 256 / 50, 10 * 256 / 100, 25 * 256 / 50,
                                                               30 * 256 / 100])
    prompt = mask_prompt_from_mask(mask, 256)
    assert prompt.shape == (1, 256, 256) and prompt.dtype == torch.float32
    assert set(prompt.unique().tolist()) == {-MASK_PROMPT_LOGIT, MASK_PROMPT_LOGIT}
    inside = prompt[0] > 0
    assert inside[int(20 * 2.56), int(15 * 5.12)] and not inside[200, 200]
    assert inside.float().mean().item() == pytest.approx(mask.mean(), abs=0.01)


@pytest.mark.parametrize("method", SAM_PROMPT_BASELINES)
def test_every_baseline_runs_on_a_batch(method):
    model = make_tiny_autosam()
    images = torch.rand(2, 3, 64, 64)
    masks = [two_objects(64, 64), np.zeros((64, 64), bool) | two_objects(64, 64)[::-1]]
    with torch.no_grad():
        embeddings = model.sam.encode(images)
        logits = prompted_logits(model.sam, embeddings, method, masks, model.low_res_logits(images, embeddings))
    assert logits.shape == (2, 1, 256, 256) and torch.isfinite(logits).all()


def test_prompts_change_sams_answer():
    """Each prompt reaches the decoder: another mask gives another output."""
    model = make_tiny_autosam()
    embeddings = model.sam.encode(torch.rand(1, 3, 64, 64))
    left, right = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    left[20:40, 5:25], right[30:50, 40:60] = True, True
    with torch.no_grad():
        for method in ("gt_box", "gt_points", "gt_mask"):
            a = prompted_logits(model.sam, embeddings, method, [left])
            b = prompted_logits(model.sam, embeddings, method, [right])
            assert (a - b).abs().max() > 1e-4, method
    with pytest.raises(ValueError, match="needs AutoSAM's low-resolution logits"):
        prompted_logits(model.sam, embeddings, "autosam_mask")
    with pytest.raises(ValueError, match="unknown SAM prompt baseline"):
        prompted_logits(model.sam, embeddings, "scribble", [left])
