"""AutoSAM's box refinement: a second pass of SAM's decoder prompted with the boxes of the first mask's components,
averaged with the first; its setting travels in the checkpoint, and every backend gives the eager result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vps
import vps.backends as backends
from conftest import make_tiny_autosam, make_tiny_sam, save_random_checkpoint
from vps.modeling import (AutoSAM, build_prompt_generator, load_model_from_checkpoint, read_checkpoint,
                          save_checkpoint)
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


def test_the_setting_comes_from_the_checkpoint_and_can_be_overridden(tmp_path):
    plain = save_random_checkpoint(tmp_path / "plain.pt", sam_backend="vit_b")
    payload = read_checkpoint(plain)
    generator = build_prompt_generator(payload["meta"]["prompt_generator"], pretrained_backbone=False)
    generator.load_state_dict(payload["prompt_generator"])
    refining = save_checkpoint(tmp_path / "refining.pt", {**payload["meta"], "box_refinement": True}, generator)
    sam = make_tiny_sam()
    assert not load_model_from_checkpoint(plain, sam=sam).box_refinement
    assert load_model_from_checkpoint(refining, sam=sam).box_refinement
    assert not load_model_from_checkpoint(refining, sam=sam, box_refinement=False).box_refinement
    assert load_model_from_checkpoint(plain, sam=sam, box_refinement=True).box_refinement
    with pytest.raises(ValueError, match="box refinement"):
        load_model_from_checkpoint(plain, model="light", box_refinement=True)


def test_the_builtin_model_refines_and_the_segmenter_can_turn_it_off():
    assert vps.Segmenter(backend="eager").model.box_refinement
    assert not vps.Segmenter(backend="eager", box_refinement=False).model.box_refinement
    with pytest.raises(ValueError, match="box refinement"):
        vps.Segmenter(model="light", box_refinement=True)


def refining_tiny_autosam() -> AutoSAM:
    model = make_tiny_autosam()
    model.box_refinement = True
    return model


@pytest.mark.parametrize("backend", [pytest.param(name, marks=pytest.mark.skipif(
    not backends.is_installed(name), reason=f"needs the {backends.BACKENDS[name].package} package"))
    for name in ("openvino", "onnx")])
def test_exported_backends_run_the_first_pass_and_refine_like_eager(backend):
    frames = np.random.RandomState(0).randint(0, 256, (3, 48, 40, 3), np.uint8)
    eager = vps.Segmenter(model=refining_tiny_autosam(), backend="eager", precision="fp32").predict(frames)
    exported = vps.Segmenter(model=refining_tiny_autosam(), backend=backend, precision="fp32", batch_size=2)
    assert exported.backend == backend
    assert exported.engine.runner.box_session is not None  # the second pass runs in the backend too
    assert np.abs(exported.predict(frames) - eager).max() < 1e-4
    plain = vps.Segmenter(model=make_tiny_autosam(), backend="eager", precision="fp32").predict(frames)
    assert np.abs(plain - eager).max() > 1e-3  # the refinement changed something
