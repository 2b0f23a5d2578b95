"""Prompt-free heads on the frozen SAM embedding (Hu et al., 2023): shapes, frozen SAM, one pass for K classes,
the ViT head's start from SAM's decoder, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_sam

from vps.modeling import (
    CheckpointError,
    PromptFreeSam,
    build_head,
    checkpoint_metadata,
    load_model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from vps.modeling.build_head import head_settings
from vps.modeling.heads import PromptFreeMaskDecoder
from vps.train.trainer import dice_bce_loss

HEADS = ("vit", "cnn", "linear")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return make_tiny_sam()


def embeddings(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 256, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("classes", [1, 3])
def test_head_output_shapes(sam, kind, classes):
    torch.manual_seed(0)
    model = PromptFreeSam(sam, build_head({"type": kind}, sam, classes)).eval()
    images = torch.rand(2, 3, 50, 70)
    assert model.low_res_logits(images).shape == (2, classes, 256, 256)
    assert model(images).shape == (2, classes, 50, 70)
    assert model(images, output_size=(30, 20)).shape == (2, classes, 30, 20)
    assert model.num_classes == classes


@pytest.mark.parametrize("kind", HEADS)
def test_gradients_reach_the_head_and_only_the_head(sam, kind):
    torch.manual_seed(0)
    model = PromptFreeSam(copy.deepcopy(sam), build_head({"type": kind}, sam, 2))
    model.train()
    assert all(not m.training for m in model.sam.modules())  # SAM stays in eval mode
    sam_before = copy.deepcopy(model.sam.state_dict())
    images = torch.rand(2, 3, 64, 64)
    target = (torch.rand(2, 2, 64, 64) > 0.5).float()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dice_bce_loss(model(images), target).backward()
    head_params = dict(model.head.named_parameters())
    assert head_params and all(p.requires_grad for p in head_params.values())
    assert not [n for n, p in head_params.items() if p.grad is None]
    assert sum(float(p.grad.abs().sum()) for p in head_params.values()) > 0
    for name, p in model.sam.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in head_params.values()}
    optimizer.step()
    assert all(torch.equal(v, model.sam.state_dict()[k]) for k, v in sam_before.items())


def test_vit_head_starts_as_sams_decoder_without_a_prompt(sam):
    """Initialised from SAM's decoder: with one class and before training it is SAM's single-mask decoder with no
    sparse prompt and no dense prompt."""
    head = build_head({"type": "vit"}, sam, 1).eval()
    image_embeddings = embeddings()
    with torch.no_grad():
        expected = sam.decode(image_embeddings, torch.zeros_like(image_embeddings))
        assert torch.allclose(head(image_embeddings), expected, atol=1e-5)
    # its weights are copies: training the head leaves SAM's decoder as it was
    assert head.transformer is not sam.mask_decoder.transformer
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in sam.parameters())


@pytest.mark.parametrize("kind", HEADS)
def test_three_classes_in_one_pass_equal_three_single_class_passes(sam, kind):
    torch.manual_seed(1)
    head = build_head({"type": kind}, sam, 3).eval()
    with torch.no_grad():
        for p in head.parameters():  # move away from the shared start, so that each class differs
            p.add_(0.05 * torch.randn_like(p))
    image_embeddings = embeddings(batch=2, seed=3)
    with torch.no_grad():
        together = head(image_embeddings)
        for k in range(3):
            single = one_class_of(head, k)
            alone = single(image_embeddings)
            assert alone.shape == (2, 1, 256, 256)
            assert torch.allclose(together[:, k:k + 1], alone, atol=1e-4, rtol=1e-4), (kind, k)
    assert not torch.allclose(together[:, 0], together[:, 1], atol=1e-3)  # the classes are not copies


def one_class_of(head, k: int):
    """A one-class head with the same weights as class k of ``head``."""
    single = copy.deepcopy(head)
    if isinstance(head, PromptFreeMaskDecoder):
        single.class_tokens = torch.nn.Parameter(head.class_tokens[k:k + 1].clone())
        single.num_classes = 1
        return single
    last = [m for m in single.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last.weight = torch.nn.Parameter(last.weight[k:k + 1].clone())
    last.bias = torch.nn.Parameter(last.bias[k:k + 1].clone())
    single.num_classes = 1
    return single


@pytest.mark.parametrize("kind", HEADS)
def test_head_checkpoint_round_trip(sam, kind, tmp_path):
    torch.manual_seed(2)
    head = build_head({"type": kind}, sam, 2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01)
    meta = checkpoint_metadata(None, "vit_b", head=head_settings({"type": kind}), classes=["gland", "lumen"])
    path = save_checkpoint(tmp_path / "head.pt", meta, None, head=head)
    payload = read_checkpoint(path)
    assert payload["meta"]["format_version"] == 2 and payload["meta"]["prompt_generator"] is None
    assert "image_pe" not in " ".join(payload["head"])  # rebuilt from SAM, not stored
    model = load_model_from_checkpoint(path, "head", sam=sam)
    assert isinstance(model, PromptFreeSam) and model.class_names == ("gland", "lumen")
    image_embeddings = embeddings(batch=1)
    with torch.no_grad():
        assert torch.equal(model.head(image_embeddings), head.eval()(image_embeddings))
    with pytest.raises(CheckpointError, match="prompt-free .* head.*--model head"):
        load_model_from_checkpoint(path, "autosam", sam=sam)
    with pytest.raises(CheckpointError, match="trained on the vit_b image embedding"):
        load_model_from_checkpoint(path, "head", sam_backend="litemedsam")


def test_g_checkpoint_is_not_a_head(random_checkpoint):
    with pytest.raises(CheckpointError, match="not a prompt-free head; use --model autosam or light"):
        load_model_from_checkpoint(random_checkpoint, "head")


def test_head_settings():
    assert head_settings(None) == {"type": "autosam_g"}
    assert head_settings({"type": "cnn"}) == {"type": "cnn", "hidden_channels": 64}
    with pytest.raises(ValueError, match="no setting hidden_channels"):
        head_settings({"type": "linear", "hidden_channels": 3})
    with pytest.raises(ValueError, match="unknown head type 'unet'"):
        head_settings({"type": "unet"})
