"""AutoSAM's flip TTA: g's dense prompt averaged with its prompt for the mirrored image (mirrored back), SAM's
encoder run once; the exported backends give the eager result. AutoSAM's inference options (this and the box
refinement) travel in the checkpoint and can be overridden."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import vps
import vps.backends as backends
from conftest import make_tiny_autosam, make_tiny_sam, save_random_checkpoint
from vps.modeling import build_prompt_generator, load_model_from_checkpoint, read_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_autosam_with(option: str, on: bool = True):
    """The tiny AutoSAM with ``option`` set, g's prompt made 20x stronger so that what an option changes in the tiny
    model's output (near 0.5 everywhere) stands well above the backends' tolerance."""
    model = make_tiny_autosam()
    with torch.no_grad():
        model.prompt_generator.decoder.project.weight.mul_(20)
    setattr(model, option, on)
    return model


def flipping_tiny_autosam():
    return tiny_autosam_with("flip_tta")


def test_the_prompt_is_the_mean_of_the_direct_and_the_mirrored_back_prompts():
    model = flipping_tiny_autosam()
    images = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        g = model.prompt_generator
        by_hand = (g(images) + g(images.flip(-1)).flip(-1)) / 2
        embeddings = model.sam.encode(images)
        logits, _ = model.first_pass(images, embeddings)
        model.flip_tta = False
        plain, _ = model.first_pass(images, embeddings)
    assert torch.allclose(logits, model.sam.decode(embeddings, by_hand), atol=1e-5)
    assert (logits - plain).abs().max() > 1e-3  # the mirrored prompt changed the output


def test_a_batch_equals_one_image_at_a_time():
    model = flipping_tiny_autosam()
    images = torch.rand(3, 3, 48, 40)
    with torch.no_grad():
        batched = model.low_res_logits(images)
        single = torch.cat([model.low_res_logits(image[None]) for image in images])
    assert torch.allclose(batched, single, atol=1e-5)


OPTIONS = [("box_refinement", "box refinement"), ("flip_tta", "flip TTA")]


@pytest.mark.parametrize("option, error", OPTIONS)
def test_an_inference_option_comes_from_the_checkpoint_and_can_be_overridden(tmp_path, option, error):
    plain = save_random_checkpoint(tmp_path / "plain.pt", sam_backend="vit_b")
    payload = read_checkpoint(plain)
    generator = build_prompt_generator(payload["meta"]["prompt_generator"], pretrained_backbone=False)
    generator.load_state_dict(payload["prompt_generator"])
    with_option = save_checkpoint(tmp_path / "with.pt", {**payload["meta"], option: True}, generator)
    sam = make_tiny_sam()
    assert not getattr(load_model_from_checkpoint(plain, sam=sam), option)
    assert getattr(load_model_from_checkpoint(with_option, sam=sam), option)
    assert not getattr(load_model_from_checkpoint(with_option, sam=sam, **{option: False}), option)
    assert getattr(load_model_from_checkpoint(plain, sam=sam, **{option: True}), option)
    with pytest.raises(ValueError, match=error):
        load_model_from_checkpoint(plain, model="light", **{option: True})


@pytest.mark.parametrize("option, error", OPTIONS)
def test_the_builtin_model_has_the_option_on_and_the_segmenter_can_turn_it_off(option, error):
    assert getattr(vps.Segmenter(backend="eager").model, option)
    assert not getattr(vps.Segmenter(backend="eager", **{option: False}).model, option)
    with pytest.raises(ValueError, match=error):
        vps.Segmenter(model="light", **{option: True})


def test_the_exported_graph_cache_tells_the_setting_apart(tmp_path):
    """A graph exported without the mirrored prompt must never be reused for a model with it (same weights)."""
    plain, flipping = make_tiny_autosam(), flipping_tiny_autosam()
    assert backends.onnx_cache_path(plain, 1, 64, tmp_path) != backends.onnx_cache_path(flipping, 1, 64, tmp_path)


@pytest.mark.parametrize("backend", [pytest.param(name, marks=pytest.mark.skipif(
    not backends.is_installed(name), reason=f"needs the {backends.BACKENDS[name].package} package"))
    for name in ("openvino", "onnx")])
@pytest.mark.parametrize("option", [option for option, _ in OPTIONS])
def test_exported_backends_run_an_inference_option_like_eager(backend, option):
    frames = np.random.RandomState(0).randint(0, 256, (3, 48, 40, 3), np.uint8)
    eager = vps.Segmenter(model=tiny_autosam_with(option), backend="eager", precision="fp32").predict(frames)
    exported = vps.Segmenter(model=tiny_autosam_with(option), backend=backend, precision="fp32", batch_size=2)
    assert exported.backend == backend
    if option == "box_refinement":
        assert exported.engine.runner.box_session is not None  # the second pass runs in the backend too
    assert np.abs(exported.predict(frames) - eager).max() < 1e-4
    without = vps.Segmenter(model=tiny_autosam_with(option, on=False), backend="eager", precision="fp32")
    assert np.abs(without.predict(frames) - eager).max() > 1e-3  # the option changed something


def test_validate_model_scores_the_model_without_each_option_and_without_all():
    script = Path(__file__).resolve().parent.parent / "scripts" / "validate_model.py"
    spec = importlib.util.spec_from_file_location("validate_model", script)
    validate_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate_model)
    off = {"box_refinement": False, "flip_tta": False, "embedding_prompt": False}
    both = validate_model.ablations({"box_refinement": True, "flip_tta": True})
    assert both == {"AutoSAM-no-box-refinement": {**off, "flip_tta": True},
                    "AutoSAM-no-flip-tta": {**off, "box_refinement": True},
                    "AutoSAM-plain": off}
    assert validate_model.ablations({"flip_tta": True}) == {"AutoSAM-no-flip-tta": off}
    assert validate_model.ablations({}) == {}
    assert validate_model.inference_options(flipping_tiny_autosam()) == {**off, "flip_tta": True}
    # a checkpoint header holds the embedding prompt head's settings: on; without it, the model it was built on
    header = {"box_refinement": True, "flip_tta": True, "embedding_prompt": {"weight": 0.3}}
    assert validate_model.ablations(header)["AutoSAM-no-embedding-prompt"] == {**off, "box_refinement": True,
                                                                               "flip_tta": True}
    from test_embedding_prompt import mixing_autosam

    mixed = mixing_autosam(0.3, flip_tta=True)
    assert validate_model.inference_options(mixed) == {**off, "flip_tta": True, "embedding_prompt": True}
    alone = validate_model.variant(mixed, {**off, "flip_tta": True})
    assert alone.embedding_prompt is None and alone.flip_tta and alone.prompt_generator is mixed.prompt_generator
    kept = validate_model.variant(mixed, {**off, "embedding_prompt": True})
    assert kept.embedding_prompt is mixed.embedding_prompt and kept.embedding_prompt_weight == 0.3
