"""AutoSAM's box refinement: a second pass of SAM's decoder prompted with the boxes of the first mask's components,
averaged with the first. Its setting in the checkpoint and the exported backends: tests/test_flip_tta.py, with the
flip TTA's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_autosam
from vps.modeling.prompts import largest_component_boxes

pytestmark = pytest.mark.usefixtures("one_thread")


def three_blobs() -> np.ndarray:
    """A 100 x 200 mask: blobs of 20 x 30, 10 x 10 and 2 x 2 pixels."""
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:30, 100:130] = True
    mask[60:70, 20:30] = True
    mask[90:92, 190:192] = True
    return mask


def test_component_boxes_largest_first_limited_and_filtered():
    mask = three_blobs()
    boxes = largest_component_boxes(mask, 256, limit=16)  # x scaled by 256 / 200, y by 256 / 100
    expected = [[128, 25.6, 166.4, 76.8], [25.6, 153.6, 38.4, 179.2], [243.2, 230.4, 245.76, 235.52]]
    assert boxes.flatten().tolist() == pytest.approx(np.ravel(expected))
    assert largest_component_boxes(mask, 256, limit=2).tolist() == boxes[:2].tolist()
    assert largest_component_boxes(mask, 256, limit=16, min_area=50).tolist() == boxes[:2].tolist()
    assert largest_component_boxes(np.zeros((8, 8), bool), 256, limit=16).shape == (0, 4)


def first_pass_logits(mask_side: int) -> torch.Tensor:
    """Two images' first-pass logits: the first with nothing above 0, the second with two blobs."""
    logits = torch.full((2, 1, mask_side, mask_side), -3.0)
    logits[1, 0, 8:20, 10:30] = 2.0
    logits[1, 0, 40:50, 40:44] = 1.0
    return logits


def test_refinement_averages_the_first_pass_with_the_united_box_masks():
    model = make_tiny_autosam()
    sam = model.sam
    images = torch.rand(2, 3, sam.image_size, sam.image_size)
    with torch.no_grad():
        embeddings = sam.encode(images)
        logits = first_pass_logits(4 * sam.embedding_shape[-1])
        refined = model.refine_with_boxes(embeddings, logits)
        scale = sam.image_size / logits.shape[-1]
        boxes = torch.tensor([[10, 8, 30, 20], [40, 40, 44, 50]], dtype=torch.float32) * scale
        by_hand = torch.maximum(sam.decode_with_prompts(embeddings[1:], boxes=boxes[:1]),
                                sam.decode_with_prompts(embeddings[1:], boxes=boxes[1:]))
    assert torch.equal(refined[0], logits[0])  # nothing to refine: the first pass as it was
    assert torch.allclose(refined[1], (logits[1] + by_hand[0]) / 2, atol=1e-5)
    assert not torch.allclose(refined[1], logits[1])


def test_refinement_of_a_batch_equals_one_image_at_a_time():
    model = make_tiny_autosam()
    model.box_refinement = True
    images = torch.rand(3, 3, 48, 40)
    with torch.no_grad():
        batched = model.low_res_logits(images)
        single = torch.cat([model.low_res_logits(image[None]) for image in images])
        first, _ = model.first_pass(images)
    assert torch.allclose(batched, single, atol=1e-5)
    assert (first > 0).any(), "the tiny model's first mask must have pixels above 0 for this test to mean something"
