"""AutoSAM's second prompt generator on SAM's image embedding: the module, its mix with g's prompt, its place in
checkpoints (format 3) and its training stage (alone through SAM's frozen decoder, chosen on the mixed model)."""

from __future__ import annotations

import copy
import csv
import sys

import numpy as np
import pytest
import torch
import yaml

import vps
import vps.backends as backends
from conftest import make_tiny_autosam, make_tiny_sam, save_random_checkpoint
from test_train import tiny_config, write_clips
from vps.cli.train import DEFAULT_CONFIG, main as train_main
from vps.config import ConfigError, apply_overrides, load_config, training_stages, validate_config
from vps.modeling import (AutoSAM, CheckpointError, EmbeddingPromptHead, build_embedding_prompt,
                          build_prompt_generator, checkpoint_metadata, load_model_from_checkpoint, read_checkpoint,
                          save_checkpoint)
from vps.modeling.build import DEFAULT_EMBEDDING_PROMPT, embedding_prompt_settings
from vps.train.trainer import dice_bce_loss

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"hidden_channels": 16, "dilations": [1, 2], "weight": 0.25}


def test_the_head_maps_an_embedding_to_a_bounded_prompt_of_the_same_shape():
    head = EmbeddingPromptHead(embed_dim=32, hidden_channels=16, dilations=(1, 2, 4))
    prompt = head(torch.randn(3, 32, 16, 16) * 5)
    assert prompt.shape == (3, 32, 16, 16)
    assert prompt.abs().max() <= 1
    with pytest.raises(ValueError, match="GroupNorm"):
        EmbeddingPromptHead(hidden_channels=12)


def mixing_autosam(weight: float = 0.25, flip_tta: bool = False) -> AutoSAM:
    model = make_tiny_autosam()
    torch.manual_seed(1)
    head = EmbeddingPromptHead(embed_dim=model.sam.embedding_shape[0], hidden_channels=16, dilations=(1, 2)).eval()
    return AutoSAM(model.sam, model.prompt_generator, flip_tta=flip_tta, embedding_prompt=head,
                   embedding_prompt_weight=weight).eval()


@pytest.mark.parametrize("flip_tta", [False, True])
def test_the_dense_prompt_is_the_weighted_mean_of_gs_and_the_heads(flip_tta):
    model = mixing_autosam(0.25, flip_tta)
    images = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        embeddings = model.sam.encode(images)
        head = model.embedding_prompt
        head_prompt = (head(embeddings) + head(embeddings.flip(-1)).flip(-1)) / 2 if flip_tta else head(embeddings)
        by_hand = 0.75 * model.dense_prompt(images) + 0.25 * head_prompt
        logits, _ = model.first_pass(images, embeddings)
        without = AutoSAM(model.sam, model.prompt_generator, flip_tta=flip_tta).eval().first_pass(images, embeddings)[0]
    assert torch.allclose(logits, model.sam.decode(embeddings, by_hand), atol=1e-5)
    assert (logits - without).abs().max() > 1e-4  # the head changed the output
    with pytest.raises(ValueError, match="embedding_prompt_weight"):
        AutoSAM(model.sam, model.prompt_generator, embedding_prompt=head, embedding_prompt_weight=0.0)


def test_a_batch_equals_one_image_at_a_time():
    model = mixing_autosam(flip_tta=True)
    model.box_refinement = True
    images = torch.rand(3, 3, 48, 40)
    with torch.no_grad():
        batched = model.low_res_logits(images)
        single = torch.cat([model.low_res_logits(image[None]) for image in images])
    assert torch.allclose(batched, single, atol=1e-5)


def checkpoint_with_head(tmp_path, weight: float = 0.25):
    plain = save_random_checkpoint(tmp_path / "plain.pt", sam_backend="vit_b")
    payload = read_checkpoint(plain)
    generator = build_prompt_generator(payload["meta"]["prompt_generator"], pretrained_backbone=False)
    generator.load_state_dict(payload["prompt_generator"])
    torch.manual_seed(2)
    head = build_embedding_prompt({**SMALL, "weight": weight}, embed_dim=make_tiny_sam().embedding_shape[0])
    meta = {**payload["meta"], **checkpoint_metadata(payload["meta"]["prompt_generator"], "vit_b",
                                                     embedding_prompt={**SMALL, "weight": weight})}
    return plain, save_checkpoint(tmp_path / "with.pt", meta, generator, embedding_prompt=head), head


def test_the_head_and_its_weight_travel_in_the_checkpoint_and_can_be_left_out(tmp_path):
    plain, with_head, head = checkpoint_with_head(tmp_path, weight=0.4)
    payload = read_checkpoint(with_head)
    assert payload["meta"]["format_version"] == 3 and payload["meta"]["embedding_prompt"]["weight"] == 0.4
    sam = make_tiny_sam()
    loaded = load_model_from_checkpoint(with_head, sam=sam)
    assert loaded.embedding_prompt_weight == 0.4
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.embedding_prompt.state_dict()[key], value)
    assert load_model_from_checkpoint(with_head, sam=sam, embedding_prompt=False).embedding_prompt is None
    assert load_model_from_checkpoint(plain, sam=sam).embedding_prompt is None
    with pytest.raises(CheckpointError, match="no embedding prompt head"):
        load_model_from_checkpoint(plain, sam=sam, embedding_prompt=True)
    with pytest.raises(ValueError, match="not AutoSAM"):
        load_model_from_checkpoint(with_head, model="light", embedding_prompt=True)


def test_metadata_and_modules_must_agree_on_the_head(tmp_path):
    plain, _, head = checkpoint_with_head(tmp_path)
    payload = read_checkpoint(plain)
    generator = build_prompt_generator(payload["meta"]["prompt_generator"], pretrained_backbone=False)
    with pytest.raises(ValueError, match="disagree"):
        save_checkpoint(tmp_path / "bad.pt", payload["meta"], generator, embedding_prompt=head)
    assert not (tmp_path / "bad.pt").exists()


def test_an_older_vps_is_told_to_upgrade_rather_than_drop_the_head(tmp_path, monkeypatch):
    import vps.modeling.build as build

    _, with_head, _ = checkpoint_with_head(tmp_path)
    monkeypatch.setattr(build, "CHECKPOINT_FORMAT_VERSION", 2)
    with pytest.raises(CheckpointError, match="upgrade vps"):
        build.read_checkpoint(with_head)


def test_the_config_section_is_checked_and_adds_a_stage(tmp_path):
    config = tiny_config(tmp_path / "data", tmp_path / "cache")
    assert training_stages(validate_config(config)) == ("g", "h")
    with pytest.raises(ConfigError, match="no model.embedding_prompt"):
        training_stages(validate_config(config), "embedding_prompt")
    config["model"]["embedding_prompt"] = dict(SMALL)
    with pytest.raises(ConfigError, match="train_embedding_prompt is missing"):
        validate_config(config)
    config["train_embedding_prompt"] = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-4,
                                        "optimizer": "adamw"}
    assert training_stages(validate_config(config)) == ("g", "embedding_prompt", "h")
    assert training_stages(validate_config(apply_overrides(config, ["model.embedding_prompt=null"]))) == ("g", "h")
    with pytest.raises(ConfigError, match="is a section, not a value"):
        apply_overrides(config, ["model.prompt_generator=null"])  # only an optional section may be turned off
    for key, value, message in [("weight", 0, "weight must be"), ("weight", 1.5, "weight must be"),
                                ("dilations", [], "dilations must be"), ("depth", 3, "no setting depth")]:
        bad = copy.deepcopy(config)
        bad["model"]["embedding_prompt"][key] = value
        with pytest.raises(ConfigError, match=message):
            validate_config(bad)
    default = load_config(DEFAULT_CONFIG)  # off in the polyp config; '{}' turns it on with its defaults
    assert training_stages(validate_config(default)) == ("g", "h")
    turned_on = validate_config(apply_overrides(default, ["model.embedding_prompt={}"]))
    assert training_stages(turned_on) == ("g", "embedding_prompt", "h")
    assert embedding_prompt_settings(turned_on["model"]["embedding_prompt"]) == DEFAULT_EMBEDDING_PROMPT
    bad = copy.deepcopy(config)
    bad["train_embedding_prompt"]["optimizer"] = "sgd"
    with pytest.raises(ConfigError, match="adam or adamw"):
        validate_config(bad)


def test_training_the_head_alone_lowers_the_loss_and_leaves_sam_unchanged():
    torch.manual_seed(0)
    sam = make_tiny_sam()
    embeddings = sam.encode(torch.rand(4, 3, 64, 64))
    masks = torch.zeros(4, 1, 256, 256)
    masks[:, :, 64:160, 80:200] = 1
    head = EmbeddingPromptHead(embed_dim=sam.embedding_shape[0], hidden_channels=16, dilations=(1, 2))
    sam_before = copy.deepcopy(sam.state_dict())
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = dice_bce_loss(sam.decode(embeddings, head(embeddings)), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02
    assert all(torch.equal(value, sam.state_dict()[key]) for key, value in sam_before.items())


def head_config(data, cache, epochs: int = 1) -> dict:
    config = tiny_config(data, cache, epochs=epochs)
    config["data"]["val_clips"] = ["c1"]
    config["model"]["embedding_prompt"] = dict(SMALL)
    config["train_embedding_prompt"] = {"epochs": epochs, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-4,
                                        "optimizer": "adamw"}
    return config


def test_vps_train_runs_g_then_the_head_then_h_and_the_model_keeps_all_three(tmp_path, capsys, monkeypatch):
    data = write_clips(tmp_path / "data", clips=2, frames=2)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(head_config(data, tmp_path / "cache"), sort_keys=False))
    out = tmp_path / "run"
    assert train_main([str(config_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("g epoch 1/1") < printed.index("embedding_prompt epoch 1/1") < printed.index("h epoch 1/1")
    payload = read_checkpoint(out / "model.pt")
    assert {"prompt_generator", "embedding_prompt", "surrogate"} <= set(payload)
    assert payload["meta"]["embedding_prompt"] == SMALL and payload["meta"]["format_version"] == 3
    rows = list(csv.DictReader((out / "log_embedding_prompt.csv").open()))
    assert len(rows) == 1 and 0 <= float(rows[0]["val_dice"]) <= 1
    model = load_model_from_checkpoint(out / "model.pt", sam=make_tiny_sam())
    assert model.embedding_prompt is not None and model.embedding_prompt_weight == 0.25
    load_model_from_checkpoint(out / "model.pt", model="light")

    from test_train import _script

    export = _script("export_model")
    for flags, kept in (([], True), (["--no-embedding-prompt"], False)):
        monkeypatch.setattr(sys, "argv", ["export_model.py", str(out), str(tmp_path / "shipped.pt"), *flags])
        export.main()
        shipped = read_checkpoint(tmp_path / "shipped.pt")
        assert ("embedding_prompt" in shipped) == kept == ("embedding_prompt" in shipped["meta"])
        assert shipped["meta"]["format_version"] == (3 if kept else 1)
        assert ("stage_embedding_prompt" in shipped["meta"]) == kept and "stage_g" in shipped["meta"]
    assert all(v.dtype == torch.float16 for v in shipped["prompt_generator"].values() if v.is_floating_point())

    capsys.readouterr()
    assert train_main([str(config_file), "--out", str(out), "--resume", "train_g.epochs=2"]) == 0
    printed = capsys.readouterr().out
    assert "stage embedding_prompt was trained on the old g" in printed
    assert (out / "embedding_prompt_last.stale.pt").is_file()
    assert "embedding_prompt" in read_checkpoint(out / "model.pt")  # retrained on the new g, then kept by h


def test_the_stage_alone_starts_from_model_init_from_and_is_chosen_on_the_mixed_model(tmp_path, capsys, monkeypatch):
    import vps.train.trainer as trainer

    data = write_clips(tmp_path / "data", clips=2, frames=2)
    start = tmp_path / "start"
    config = head_config(data, tmp_path / "cache")
    config.pop("train_embedding_prompt")
    config["model"].pop("embedding_prompt")
    config_file = tmp_path / "plain.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    assert train_main([str(config_file), "--out", str(start), "--stage", "g"]) == 0
    g_trained = read_checkpoint(start / "model.pt")["prompt_generator"]

    scored = []
    original = trainer.evaluate

    def spy(module, forward, loader, runtime):
        scored.append(forward.__name__)
        return original(module, forward, loader, runtime)

    monkeypatch.setattr(trainer, "evaluate", spy)
    config_file.write_text(yaml.safe_dump(head_config(data, tmp_path / "cache"), sort_keys=False))
    out = tmp_path / "head-only"
    assert train_main([str(config_file), "--out", str(out), "--stage", "embedding_prompt",
                       f"model.init_from={start / 'model.pt'}"]) == 0
    assert scored == ["alone", "mixed"]  # g alone first, then each epoch's mix
    payload = read_checkpoint(out / "model.pt")
    assert all(torch.equal(payload["prompt_generator"][k], v) for k, v in g_trained.items())  # g is not trained
    assert "embedding_prompt" in payload
    started_from = read_checkpoint(start / "model.pt")["meta"]
    assert payload["meta"]["split_seed"] == started_from["split_seed"]  # g's own provenance stays in the header
    assert payload["meta"]["embedding_prompt_trained_on"] == [str(data)]

    capsys.readouterr()
    assert train_main([str(config_file), "--out", str(tmp_path / "nothing"), "--stage", "embedding_prompt"]) == 2
    assert "run stage g first" in capsys.readouterr().err


@pytest.mark.parametrize("backend", [pytest.param(name, marks=pytest.mark.skipif(
    not backends.is_installed(name), reason=f"needs the {backends.BACKENDS[name].package} package"))
    for name in ("openvino", "onnx")])
def test_exported_backends_run_the_mixed_prompt_like_eager(backend, tmp_path):
    def model():
        mixed = mixing_autosam(0.5, flip_tta=True)
        with torch.no_grad():  # a stronger head, so that what it changes stands above the backends' tolerance
            mixed.embedding_prompt.out.weight.mul_(20)
        mixed.box_refinement = True
        return mixed

    frames = np.random.RandomState(0).randint(0, 256, (3, 48, 40, 3), np.uint8)
    eager = vps.Segmenter(model=model(), backend="eager", precision="fp32").predict(frames)
    exported = vps.Segmenter(model=model(), backend=backend, precision="fp32", batch_size=2)
    assert exported.backend == backend
    assert np.abs(exported.predict(frames) - eager).max() < 1e-4
    alone = model()
    alone.embedding_prompt, alone.embedding_prompt_weight = None, 0.0
    assert np.abs(vps.Segmenter(model=alone, backend="eager", precision="fp32").predict(frames) - eager).max() > 1e-3
    assert backends.onnx_cache_path(alone, 2, 64, tmp_path) != backends.onnx_cache_path(model(), 2, 64, tmp_path)


def test_a_head_whose_mix_never_beats_g_alone_is_left_out(tmp_path, capsys, monkeypatch):
    import vps.train.trainer as trainer

    data = write_clips(tmp_path / "data", clips=2, frames=2)
    config = head_config(data, tmp_path / "cache", epochs=2)
    trainer.train(config, tmp_path / "run", stages=("g",))
    real = trainer.evaluate
    scores = {"alone": iter([0.8]), "mixed": iter([0.7, 0.8])}  # the mixes tie with g alone at best
    monkeypatch.setattr(trainer, "evaluate", lambda module, forward, loader, runtime: (
        real(module, forward, loader, runtime)[0], next(scores[forward.__name__]), {}))
    trainer.train(config, tmp_path / "run", stages=("embedding_prompt",))
    printed = capsys.readouterr().out
    assert "g alone scores validation Dice 0.8000" in printed and "no epoch's mix beat g alone" in printed
    payload = read_checkpoint(tmp_path / "run" / "model.pt")
    assert "embedding_prompt" not in payload and "embedding_prompt" not in payload["meta"]
    assert payload["meta"]["format_version"] == 1
    assert len(list(csv.DictReader((tmp_path / "run" / "log_embedding_prompt.csv").open()))) == 2
