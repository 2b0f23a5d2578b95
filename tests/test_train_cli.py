"""vps-train's command line: resume with the run's own config, config validation first, one-line errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from test_train import tiny_config, write_clips
from vps.cli.train import DEFAULT_CONFIG, error_message, main
from vps.config import ConfigError, save_config, validate_config
from vps.modeling import read_checkpoint
from vps.modeling.build import load_model_from_checkpoint
from vps.train.data import DataError, discover_samples
from vps.train.verify import verify_decodable

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vps-train: error: ") and "\n" not in err, err
    return err


def test_resume_uses_the_runs_config_and_keeps_h_in_the_model(tmp_path, capsys):
    """A run with a non-default data.root resumes on its own data (the config file's root does not exist); resuming
    a finished run leaves g + h in model.pt; extending g retrains h on the new g so model.pt ends with both."""
    data = write_clips(tmp_path / "data", clips=2, frames=2)
    config = tiny_config(tmp_path / "missing-data", tmp_path / "cache", epochs=1)
    config["data"]["val_clips"] = ["c1"]
    config_file = write_config(tmp_path / "tiny.yaml", config)
    out = tmp_path / "run"
    assert main([str(config_file), f"data.root={data}", "--out", str(out)]) == 0
    assert "surrogate" in read_checkpoint(out / "model.pt")

    capsys.readouterr()
    assert main([str(config_file), "--out", str(out), "--resume"]) == 0  # all epochs done: nothing trains
    printed = capsys.readouterr().out
    assert "stage g already finished its 1 epochs" in printed and "stage h already finished its 1 epochs" in printed
    assert "surrogate" in read_checkpoint(out / "model.pt")
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["root"] == str(data)

    assert main([str(config_file), "--out", str(out), "--resume", "train_g.epochs=2"]) == 0
    printed = capsys.readouterr().out
    assert "resuming stage g after epoch 1 of 2" in printed and "g epoch 2/2" in printed
    assert "h epoch 1/1" in printed  # h starts again on the new g
    assert (out / "h_last.stale.pt").is_file()
    load_model_from_checkpoint(out / "model.pt", model="light")  # what --model light does
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train_g"]["epochs"] == 2 and saved["data"]["root"] == str(data)


@pytest.fixture
def saved_run(tmp_path) -> Path:
    """A run folder with a saved config (data that does not exist: nothing here reaches training)."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(tiny_config(tmp_path / "nodata", tmp_path / "cache"), run / "config.yaml")
    return run


@pytest.mark.parametrize("override, key", [
    ("data.root=/elsewhere", "data.root"),
    ("data.val_clips=[c0]", "data.val_clips"),
    ("model.surrogate.hidden_channels=4", "model.surrogate.hidden_channels"),
    ("cache.views=[identity]", "cache.views"),
    ("augment.vflip=false", "augment.vflip"),
    ("train_g.lr=0.1", "train_g.lr"),
])
def test_resume_refuses_to_change_data_model_or_recipe(saved_run, capsys, override, key):
    assert main(["--out", str(saved_run), "--resume", override]) == 2
    assert f"--resume: {key} cannot change on resume" in one_error_line(capsys)


def test_resume_accepts_epochs_and_repeated_values_and_needs_a_run(saved_run, tmp_path, capsys):
    # epochs, runtime.* and a repeated value pass the resume rules: the run then stops at its (missing) data
    root = yaml.safe_load((saved_run / "config.yaml").read_text())["data"]["root"]
    assert main(["--out", str(saved_run), "--resume", "train_g.epochs=9", "train_h.epochs=9",
                 "runtime.num_workers=1", f"data.root={root}"]) == 2
    assert "data folder not found" in one_error_line(capsys)
    torch.save({"epoch": 2}, saved_run / "g_last.pt")  # 3 epochs of g done
    assert main(["--out", str(saved_run), "--resume", "train_g.epochs=2"]) == 2
    assert "train_g.epochs=2 is below the 3 epochs" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no run to resume" in one_error_line(capsys)


@pytest.mark.parametrize("override, message", [
    ("train_g=5", "'train_g' is a section, not a value"),
    ("train_g.epochs=abc", "train_g.epochs must be an integer >= 1, got 'abc'"),
    ("train_g.epochs=-1", "train_g.epochs must be an integer >= 1, got -1"),
    ("train_h.epochs=0", "train_h.epochs must be an integer >= 1, got 0"),
    ("train_g.batch_size=2.5", "train_g.batch_size must be an integer >= 1"),
    ("train_h.batch_size=0", "train_h.batch_size must be an integer >= 1"),
    ("train_g.lr=abc", "train_g.lr must be a number > 0"),
    ("train_g.lr=0", "train_g.lr must be a number > 0"),
    ("train_g.weight_decay=-1e-5", "train_g.weight_decay must be a number >= 0"),
    ("data.val_fraction=2", "data.val_fraction must be a number in [0, 1), got 2"),
    ("runtime.num_workers=-1", "runtime.num_workers must be an integer >= 0"),
    ("runtime.precision=fp8", "runtime.precision must be one of auto|fp32|bf16|fp16"),
    ("runtime.encoder_backend=gpu", "runtime.encoder_backend must be one of auto|eager|openvino|onnx|compile"),
    ("cache.views=[identity,sideways]", "cache.views must be a non-empty list of views"),
    ("cache.derived_views=[sideways]", "cache.derived_views must be null or a list of views"),
    ("cache.validation=3", "cache.validation must be true or false, got 3"),
    ("train_g.ema_decay=1", "train_g.ema_decay must be null or a number in (0, 1), got 1"),
    ("train_g.schedule_by=batch", "train_g.schedule_by must be epoch or step, got 'batch'"),
    ("model.sam.backend=vit_x", "model.sam.backend must be one of"),
    ("data.root=[]", "data.root must be a folder or a non-empty list of folders"),
])
def test_bad_settings_are_one_line_errors_before_any_work(tmp_path, capsys, override, message):
    # the data folder does not exist: an error naming the key shows validation runs before data and SAM
    config_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "nodata", tmp_path / "cache"))
    assert main([str(config_file), override, "--out", str(tmp_path / "run")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_validate_config_checks_only_the_keys_it_knows(tmp_path):
    config = tiny_config(tmp_path / "a", tmp_path / "cache")
    config["data"]["root"] = [str(tmp_path / "a"), str(tmp_path / "b")]  # several sources
    config["data"]["negatives"] = {"root": "x", "fraction": 0.1}
    config["train_g"].update(schedule="cosine", warmup_epochs=2, lr="3e-4")  # YAML 1.1 reads 3e-4 as a string
    config["new_section"] = {"anything": [1, 2]}
    checked = validate_config(config)
    assert checked["train_g"]["lr"] == pytest.approx(3e-4) and isinstance(checked["train_g"]["lr"], float)
    assert config["train_g"]["lr"] == "3e-4"  # the input is not modified
    del config["train_g"]["epochs"]
    with pytest.raises(ConfigError, match="train_g.epochs is missing"):
        validate_config(config)
    with pytest.raises(ConfigError, match="train_h must be a section"):
        validate_config({**tiny_config(tmp_path, tmp_path), "train_h": 5})


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--stage", "x"])
    assert exit_info.value.code == 2
    assert "--stage: invalid choice" in one_error_line(capsys)
    assert Path(DEFAULT_CONFIG).is_file() and Path(DEFAULT_CONFIG).is_absolute()


def write_truncated_stills(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in ("a", "b"):
        image = (torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(image).save(root / "images" / f"{name}.jpg", quality=90)
        Image.new("L", (48, 40)).save(root / "masks" / f"{name}.png")
    jpeg = (root / "images" / "b.jpg").read_bytes()
    (root / "images" / "b.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root


def test_truncated_jpeg_stops_the_run_before_training_in_one_line(tmp_path, capsys):
    stills = write_truncated_stills(tmp_path / "stills")
    with pytest.raises(DataError, match=r"1 of 4 image files cannot be decoded.*b\.jpg.*truncated"):
        verify_decodable(discover_samples(stills))
    config_file = write_config(tmp_path / "tiny.yaml", tiny_config(stills, tmp_path / "cache"))
    assert main([str(config_file), "data.val_clips=null", "runtime.num_workers=2", "--out", str(tmp_path / "run")]) == 2
    assert "b.jpg" in one_error_line(capsys)
    assert not (tmp_path / "cache").exists()  # stopped before SAM and the cache


def test_only_the_main_process_decodes_every_file(tmp_path, monkeypatch):
    """Under torchrun every process runs the CLI: the data check runs once, in rank 0, not once per process."""
    import vps.train.trainer as trainer
    import vps.train.verify as verify

    data = write_clips(tmp_path / "data", clips=2, frames=2)
    config_file = write_config(tmp_path / "tiny.yaml", tiny_config(data, tmp_path / "cache"))
    checked = []
    monkeypatch.setattr(verify, "verify_decodable", lambda samples: checked.append(len(list(samples))))
    monkeypatch.setattr(trainer, "train", lambda config, out, **kwargs: Path(out) / "model.pt")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert main([str(config_file), "--out", str(tmp_path / f"run{rank}")]) == 0
    assert checked == [4]  # rank 0 only, every frame of the two clips


class _FailingDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DataError("cannot read b.jpg/b.png: image file is truncated")


def test_an_error_raised_in_a_dataloader_worker_becomes_one_line():
    loader = torch.utils.data.DataLoader(_FailingDataset(), num_workers=1)
    with pytest.raises(DataError) as error_info:
        next(iter(loader))
    assert "Original Traceback" in str(error_info.value)  # torch puts the worker's traceback in the message
    assert error_message(error_info.value) == "cannot read b.jpg/b.png: image file is truncated"


def test_train_image_sh_keeps_the_callers_folder(tmp_path):
    """No cd: a relative config and the default --out (runs/<name>) are the caller's; the default config is found."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = str(REPO / "scripts" / "train_image.sh")
    write_config(tmp_path / "mine.yaml", tiny_config(tmp_path / "nodata", tmp_path / "cache"))
    broken = tiny_config(tmp_path / "nodata", tmp_path / "cache")
    broken["train_g"]["epochs"] = "abc"
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    write_config(tmp_path / "runs" / "mine" / "config.yaml", broken)
    result = subprocess.run(["bash", script, "mine.yaml", "--resume"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "vps-train: error: train_g.epochs must be an integer >= 1, got 'abc'"]
    result = subprocess.run(["bash", script, "train_h.epochs=abc"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "vps-train: error: train_h.epochs must be an integer >= 1, got 'abc'"]


def test_init_from_on_the_command_line_is_read_once_and_starts_training(tmp_path, monkeypatch, capsys):
    import vps.modeling.build as build
    import vps.train.trainer as trainer

    data = write_clips(tmp_path / "data", clips=2, frames=2)
    config = tiny_config(data, tmp_path / "cache", epochs=1)
    config["data"]["val_clips"] = ["c1"]
    config["model"]["init_from"] = None
    config_file = write_config(tmp_path / "tiny.yaml", config)
    assert main([str(config_file), "--out", str(tmp_path / "first"), "--stage", "g"]) == 0
    reads = []
    real = build.initial_weights
    monkeypatch.setattr(build, "initial_weights", lambda *args: reads.append(args) or real(*args))
    monkeypatch.setattr(trainer, "initial_weights", lambda *args: reads.append(args) or real(*args))
    capsys.readouterr()
    first = tmp_path / "first" / "model.pt"
    assert main([str(config_file), f"model.init_from={first}", "--out", str(tmp_path / "tuned"), "--stage", "g"]) == 0
    assert len(reads) == 1
    assert "g before training (model.init_from): validation Dice" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "tuned" / "model.pt")["meta"]["init_from"] == str(first)


def test_init_from_errors_are_one_line_before_any_work(tmp_path, capsys):
    config = tiny_config(tmp_path / "nodata", tmp_path / "cache")
    config["model"]["init_from"] = None
    config_file = write_config(tmp_path / "tiny.yaml", config)
    assert main([str(config_file), f"model.init_from={tmp_path / 'missing.pt'}", "--out", str(tmp_path / "run")]) == 2
    assert "checkpoint not found" in one_error_line(capsys)
    # the built-in model is LiteMedSAM + EfficientNet-Lite0: a tiny vit_b config cannot start from it
    assert main([str(config_file), "model.init_from=builtin", "--out", str(tmp_path / "run")]) == 2
    assert "does not match the model" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    config["model"].update(init_from="builtin", head={"type": "linear"})
    with pytest.raises(ConfigError, match="cannot start from one"):
        validate_config(config)
