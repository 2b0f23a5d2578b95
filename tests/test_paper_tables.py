"""scripts/paper_tables.py end to end on synthetic nuclei with tiny random SAMs: every row trained by vps-train,
scored by vps-eval, the table printed from vps-eval's files; a second invocation and --dry-run train nothing."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from test_train import tiny_config
from test_train_heads import head_config
from vps.modeling import read_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "paper_tables.py"
MONUSEG_ROWS = ("U-Net (published only", "AutoSAM: g + frozen SAM", "light model h(g(I))", "Hu et al. ViT head",
                "Hu et al. CNN head", "Hu et al. linear head", "SAM + GT point per object",
                "SAM + GT mask as mask prompt", "SAM + AutoSAM output as mask prompt", "SAM + GT box per object")


def write_nuclei(root: Path, count: int, seed: int, size: int = 64) -> Path:
    """Stills root/images + root/masks: a few small dark discs ("nuclei") on a pink textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n in range(count):
        mask = np.zeros((size, size), bool)
        for _ in range(4):
            cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(3, 6)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        image = np.clip(rng.normal((230, 170, 200), 12, (size, size, 3)), 0, 255).astype(np.uint8)
        image[mask] = (90, 40, 140)
        Image.fromarray(image).save(root / "images" / f"img{n}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"img{n}.png")
    return root


def tiny_configs(folder: Path, train, crop=None) -> tuple:
    """The AutoSAM and head configs of the table, tiny: random SAM (64 px input, windowed attention only), one random
    crop of 48 px per image (MoNuSeg's recipe at this scale), 1 epoch."""
    crop = {"size": 48, "per_image": 1} if crop is None else crop
    autosam = tiny_config(train, folder / "unused-cache", epochs=1)
    head = head_config(train, folder / "unused-cache", "vit", epochs=1)
    for config in (autosam, head):
        config["data"].update(val_clips=None, val_fraction=0.4, random_crop=crop or None)
        config["cache"]["views"] = ["identity"]
        sam = config["model"]["sam"]
        sam["encoder_overrides"] = {**sam["encoder_overrides"], "global_attn_indexes": []}
    paths = folder / "autosam.yaml", folder / "head.yaml"
    for path, config in zip(paths, (autosam, head)):
        path.write_text(yaml.safe_dump(config))
    return paths


def load_script():
    """The script as a module, to run its quick paths (plans, argument errors) without starting a process."""
    saved = os.environ.get("PYTHONPATH")
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # puts the checkout on PYTHONPATH for its vps-train processes
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved
    return module


def run_in_process(capsys, *arguments) -> tuple:
    code = load_script().main([str(a) for a in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_tables(*arguments, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, arguments)], capture_output=True, text=True,
                            env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def monuseg(tmp_path_factory):
    """Synthetic MoNuSeg (5 training images, 2 test images), tiny configs, and the table made once."""
    folder = tmp_path_factory.mktemp("paper")
    train, test = write_nuclei(folder / "train", 5, seed=0), write_nuclei(folder / "test", 2, seed=1)
    autosam, head = tiny_configs(folder, train)
    common = ["--runs", folder / "runs", "--cache-dir", folder / "cache", "--train", train, "--test", test,
              "--autosam-config", autosam, "--head-config", head, "--device", "cpu"]
    first = run_tables("--table", "monuseg", *common, "--out", folder / "out")
    return {"folder": folder, "common": common, "first": first}


def table_lines(stdout: str) -> list:
    """The printed table's rows (after the header line naming the test set)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"monuseg-test: 2 images, image protocol", line))
    assert lines[start + 2].startswith("method")  # pandas' index header
    return lines[start + 3:start + 3 + len(MONUSEG_ROWS)]


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    train, test = write_nuclei(tmp_path / "train", 5, seed=0), write_nuclei(tmp_path / "test", 2, seed=1)
    autosam, head = tiny_configs(tmp_path, train)
    code, out, err = run_in_process(capsys, "--table", "monuseg", "--runs", tmp_path / "runs", "--cache-dir",
                                    tmp_path / "cache", "--train", train, "--test", test, "--autosam-config", autosam,
                                    "--head-config", head, "--device", "cpu", "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert "dry run: nothing trained or written" in out
    assert len(re.findall(r"run monuseg-\w+-[0-9a-f]{10}: train;", out)) == 4  # autosam (g + h), vit, cnn, linear
    assert out.count("scripts/train_image.sh") == 4 and "model.head={type: cnn}" in out
    assert "maps of 9 of 9 rows to compute" in out and "tiles of 48 px" in out


def test_epochs_of_one_head_override_the_heads_epochs(tmp_path, capsys):
    train, test = write_nuclei(tmp_path / "train", 5, seed=0), write_nuclei(tmp_path / "test", 2, seed=1)
    autosam, head = tiny_configs(tmp_path, train)
    code, out, err = run_in_process(capsys, "--table", "monuseg", "--runs", tmp_path / "runs", "--cache-dir",
                                    tmp_path / "cache", "--train", train, "--test", test, "--autosam-config", autosam,
                                    "--head-config", head, "--epochs", "g=2", "h=1", "head=3", "linear=7", "--dry-run")
    assert code == 0, err
    planned = dict(re.findall(r"run monuseg-(\w+)-[0-9a-f]{10}: train; (.*) epochs", out))
    assert planned == {"autosam": "g 2, h 1", "vit": "head 3", "cnn": "head 3", "linear": "head 7"}
    with pytest.raises(SystemExit):
        run_in_process(capsys, "--table", "monuseg", "--epochs", "unet=3", "--dry-run")
    assert "--epochs: the stages are g, h and head (or one head: vit, cnn, linear)" in capsys.readouterr().err


def test_the_autosam_row_is_the_papers_without_the_embedding_prompt(tmp_path, capsys):
    train, test = write_nuclei(tmp_path / "train", 5, seed=0), write_nuclei(tmp_path / "test", 2, seed=1)
    autosam, head = tiny_configs(tmp_path, train)
    config = yaml.safe_load(autosam.read_text())
    config["model"]["embedding_prompt"] = {"hidden_channels": 16, "dilations": [1], "weight": 0.5}
    config["train_embedding_prompt"] = dict(config["train_g"])
    autosam.write_text(yaml.safe_dump(config))
    code, out, err = run_in_process(capsys, "--table", "monuseg", "--rows", "g", "--runs", tmp_path / "runs",
                                    "--cache-dir", tmp_path / "cache", "--train", train, "--test", test,
                                    "--autosam-config", autosam, "--head-config", head, "--dry-run")
    assert code == 0, err
    assert dict(re.findall(r"run monuseg-(\w+)-[0-9a-f]{10}: train; (.*) epochs", out)) == {"autosam": "g 1, h 1"}
    assert "model.embedding_prompt=null" in out


def test_table_has_every_row_with_vps_eval_numbers(monuseg):
    folder, out = monuseg["folder"], monuseg["first"].stdout
    rows = table_lines(out)
    for label, line in zip(MONUSEG_ROWS, rows):
        assert line.startswith(label), (label, line)
    assert rows[0].split()[-3:-1] == ["79.4", "-"]  # U-Net: published only
    # each row's Dice and IoU are vps-eval's Dice@0.5 and IoU@0.5 of that row's maps, read from its summary.json
    evaluated = json.loads(next((folder / "out" / "eval").rglob("summary.json")).read_text())
    assert len(evaluated) == 9
    with open(folder / "out" / "table.csv") as handle:
        records = list(csv.DictReader(handle))
    assert [r["row"] for r in records] == ["g", "h", "vit", "cnn", "linear", "gt_points", "gt_mask", "autosam_mask",
                                           "gt_boxes"]
    for record, line, summary in zip(records, rows[1:], evaluated.values()):
        assert float(record["Dice@0.5"]) == pytest.approx(summary["Dice@0.5"])
        assert float(record["meanIoU"]) == pytest.approx(summary["meanIoU"])
        label_end = len(record["method"])
        dice, iou, mean_dice, mean_iou = line[label_end:].split()[:4]
        assert dice == f"{100 * summary['Dice@0.5']:.1f}" and iou == f"{100 * summary['IoU@0.5']:.1f}"
        assert mean_dice == f"{100 * summary['meanDice']:.1f}" and mean_iou == f"{100 * summary['meanIoU']:.1f}"
    assert "82.4" in rows[1].split()  # the AutoSAM paper's number beside ours (configs/published_numbers.yaml)
    assert "s, trained now" in rows[1] and "hardware: " in out
    assert re.search(r"monuseg-vit-[0-9a-f]{10}: head 1 epochs, \d+ s, trained now; .*torch", out)
    assert (folder / "out" / "table.txt").read_text().strip() in out


def test_second_invocation_reuses_every_run(monuseg):
    folder = monuseg["folder"]
    models = sorted((folder / "runs").glob("monuseg-*/model.pt"))
    assert len(models) == 4
    times = [m.stat().st_mtime_ns for m in models]
    maps = sorted((folder / "runs").rglob("maps/*/*"))
    again = run_tables("--table", "monuseg", *monuseg["common"], "--out", folder / "out2")
    assert again.stdout.count(": reuse;") == 4 and "maps of 0 of 9 rows to compute" in again.stdout
    assert "trained model:" not in again.stdout and "[1/" not in again.stdout
    assert [m.stat().st_mtime_ns for m in models] == times
    assert sorted((folder / "runs").rglob("maps/*/*")) == maps
    assert [line.split() for line in table_lines(again.stdout)] == [
        line.replace("trained now", "reused").split() for line in table_lines(monuseg["first"].stdout)]


def test_an_interrupted_run_continues_with_resume(monuseg):
    folder = monuseg["folder"]
    linear = next((folder / "runs").glob("monuseg-linear-*"))
    done = json.loads((linear / "paper_tables.json").read_text())
    (linear / "paper_tables.json").write_text(json.dumps({**done, "finished": False}))
    result = run_tables("--table", "monuseg", *monuseg["common"], "--rows", "linear", "--out", folder / "out3")
    assert "continue (vps-train --resume)" in result.stdout and "already finished its 1 epochs" in result.stdout
    assert json.loads((linear / "paper_tables.json").read_text())["finished"] is True


def test_autosam_rows_from_a_given_checkpoint_train_nothing_and_score_the_same(monuseg, tmp_path, capsys):
    folder = monuseg["folder"]
    trained = next((folder / "runs").glob("monuseg-autosam-*[0-9a-f]/model.pt"))
    common = [a if a != folder / "runs" else tmp_path / "runs" for a in monuseg["common"]]  # no run to reuse
    result = run_tables("--table", "monuseg", *common, "--rows", "g", "h", "--autosam-model", trained,
                        "--out", tmp_path / "out")
    out = result.stdout
    assert re.search(r"run monuseg-autosam-given-[0-9a-f]{10}: given \(--autosam-model ", out)
    assert "[1/" not in out and "trained model:" not in out  # vps-train never ran
    given = next((tmp_path / "runs").glob("monuseg-autosam-given-*"))
    assert (given / "model.pt").read_bytes() == trained.read_bytes()
    labels = ("AutoSAM: g + frozen SAM", "light model h(g(I)), no SAM")
    before = {label: line[len(label):].split()[:4] for line in table_lines(monuseg["first"].stdout)
              for label in labels if line.startswith(label)}
    now = {label: line[len(label):].split() for line in out.splitlines() for label in labels if line.startswith(label)}
    assert len(before) == len(now) == 2
    for label in labels:  # Dice, IoU, meanDice, meanIoU: the same weights give the same maps
        assert now[label][:4] == before[label] and now[label][-1] == "given", (label, now[label])
    assert re.search(r"monuseg-autosam-given-[0-9a-f]{10}: g 1, h 1 epochs, given: ", out)
    head = next((folder / "runs").glob("monuseg-vit-*/model.pt"))
    code, _, err = run_in_process(capsys, "--table", "monuseg", *common, "--autosam-model", head, "--dry-run")
    assert code == 2 and "not an AutoSAM checkpoint with g and h" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        run_in_process(capsys, "--table", "label-efficiency", *common, "--autosam-model", trained)
    assert "--autosam-model: the label-efficiency curve trains g" in capsys.readouterr().err


def test_label_efficiency_curve_reuses_the_full_runs_and_plots(monuseg):
    folder = monuseg["folder"]
    result = run_tables("--table", "label-efficiency", *monuseg["common"], "--rows", "linear",
                        "--counts", "1", "all", "--out", folder / "efficiency")
    out = result.stdout
    assert re.search(r"run monuseg-linear-[0-9a-f]{10}: reuse;", out)  # "all": the MoNuSeg table's run
    assert len(re.findall(r"run monuseg-n1-linear-[0-9a-f]{10}: train;", out)) == 1
    header = next(line for line in out.splitlines() if "n=1" in line)
    assert header.split() == ["n=1", "n=3"]  # 5 images less the 2 of the seeded validation split
    assert (folder / "efficiency" / "label_efficiency.png").stat().st_size > 1000
    run = next((folder / "runs").glob("monuseg-n1-linear-*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    subset = Path(config["data"]["root"])
    assert len(list((subset / "images").iterdir())) == 1 + len(config["data"]["val_clips"]) == 3
    with open(folder / "efficiency" / "table.csv") as handle:
        assert [int(r["images"]) for r in csv.DictReader(handle)] == [1, 3]


def test_errors_are_one_line(monuseg, tmp_path, capsys):
    common = monuseg["common"]
    for arguments, message in (
            (["--rows", "unet-of-mine"], "--rows: unet-of-mine not in the monuseg table"),
            (["--set", "train_g.epoch=3"], "--set train_g.epoch=3: no run's config has that key"),
            (["--test", tmp_path / "absent"], "data folder not found"),
            (["--test", monuseg["folder"] / "train" / "images"], "lie in the training data"),
            (["--counts", "0"], "--counts: 0")):
        try:
            code, _, err = run_in_process(capsys, "--table", "monuseg", *common, *arguments, "--dry-run")
        except SystemExit as exit_request:  # argparse's errors
            code, err = exit_request.code, capsys.readouterr().err
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_polyp_table_scores_the_checkpoints_validation_split(tmp_path):
    """Clips (video protocol) and stills (image protocol), each its own block, on the split vps-train recorded."""
    from test_train import write_clips

    clips, stills = write_clips(tmp_path / "clips", clips=3, frames=4), write_nuclei(tmp_path / "stills", 5, seed=2)
    autosam, head = tiny_configs(tmp_path, [str(clips), str(stills)], crop=False)
    result = run_tables("--table", "polyps", "--rows", "linear", "gt_mask", "--runs", tmp_path / "runs",
                        "--cache-dir", tmp_path / "cache", "--train", clips, stills, "--autosam-config", autosam,
                        "--head-config", head, "--device", "cpu", "--out", tmp_path / "out")
    run = next((tmp_path / "runs").glob("polyps-linear-*"))
    val_clips = read_checkpoint(run / "model.pt")["meta"]["val_clips"]
    assert len(val_clips) == 1 + 2  # one of the 3 clips, 2 of the 5 stills
    out = result.stdout
    assert "polyps-clips: 4 images, video protocol (vps-eval, %)" in out
    assert "polyps-stills: 2 images, image protocol (vps-eval, %)" in out
    frames = sorted(p.relative_to(run / "maps") for p in (run / "maps").rglob("*.png"))
    clip = next(c for c in val_clips if c.startswith("c"))
    assert [str(p).split("/", 1)[1] for p in frames if "clips" in str(p)] == [
        f"linear/clips/{clip}/{n}.png" for n in range(1, 5)]
    with open(tmp_path / "out" / "table.csv") as handle:
        records = list(csv.DictReader(handle))
    assert [(r["source"], r["row"]) for r in records] == [("clips", "linear"), ("clips", "gt_mask"),
                                                          ("stills", "linear"), ("stills", "gt_mask")]
