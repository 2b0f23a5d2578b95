"""vps-eval end to end on small synthetic data, and its one-line errors (exit status 2)."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from eval.cli import main


def write_frames(folder, stems, shape=(16, 20), pred=False, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        image = np.zeros(shape, np.uint8)
        image[4:12, 5 + shift + i % 2 : 13 + shift + i % 2] = 200 if pred else 255
        if pred:
            image = cv2.GaussianBlur(image, (5, 5), 1.5)
        cv2.imwrite(str(folder / f"{stem}.png"), image)


@pytest.fixture
def sunseg(tmp_path):
    """SUN-SEG layout with two unseen easy cases and a prediction folder."""
    gt = tmp_path / "SUN-SEG" / "TestEasyDataset" / "Unseen" / "GT"
    cases = {"case1_1": [f"case1_1_a_{i}" for i in (1, 2, 3, 10)], "case2_3": [f"case2_3_b_{i}" for i in range(1, 6)]}
    for case, stems in cases.items():
        write_frames(gt / case, stems)
        write_frames(tmp_path / "pred" / case, stems, pred=True)
    return tmp_path


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("vps-eval: error: ")
    return err[0]


def test_sunseg_end_to_end(sunseg, capsys):
    out_dir = sunseg / "out"
    args = ["--split", "easy", "--data-root", str(sunseg / "SUN-SEG"), "--pred-root", str(sunseg / "pred")]
    assert main(args + ["--out-dir", str(out_dir), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for column in ("Smeasure", "meanEm", "wFmeasure", "meanFm", "maxDice", "meanSen"):
        assert column in printed
    summary = json.loads((out_dir / "summary.json").read_text())
    assert {"Smeasure", "maxDice", "meanSen", "Dice@0.5", "IoU@0.5", "adpEm", "maxIoU"} <= set(summary)
    per_clip = pd.read_csv(out_dir / "per_clip.csv")
    assert list(per_clip["clip"]) == ["case1_1", "case2_3"]
    assert list(per_clip["n_frames"]) == [2, 3]  # first and last frame of each clip dropped
    assert summary["Smeasure"] == pytest.approx(per_clip["Smeasure"].mean())
    for curve in ("Fm", "Em", "Dice"):
        assert (out_dir / f"curve_{curve}.png").stat().st_size > 0
    assert len(list((out_dir / ".cache").rglob("*.npz"))) == 2


def test_methods_and_image_protocol(tmp_path, capsys):
    write_frames(tmp_path / "gt", ["a", "b", "c"])
    write_frames(tmp_path / "good", ["a", "b", "c"], pred=True)
    write_frames(tmp_path / "bad", ["a", "b", "c"], pred=True, shift=4)
    args = ["--gt-root", str(tmp_path / "gt"), "--protocol", "image", "--all", "--workers", "1"]
    assert main(args + ["--methods", str(tmp_path / "good"), str(tmp_path / "bad"), "--out-dir", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "good" in printed and "bad" in printed and "Dice@0.5" in printed
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["good"]["Dice@0.5"] > summary["bad"]["Dice@0.5"]
    assert pd.read_csv(tmp_path / "o" / "per_clip.csv")["n_frames"].tolist() == [3, 3]  # nothing dropped


def test_resized_predictions_are_accepted(tmp_path, capsys):
    write_frames(tmp_path / "gt" / "c", ["1", "2", "3"], shape=(32, 40))
    write_frames(tmp_path / "pred" / "c", ["1", "2", "3"], shape=(16, 20), pred=True)
    assert main(["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", "1"]) == 0


def test_missing_frames_error_or_empty(tmp_path, capsys):
    write_frames(tmp_path / "gt" / "c", ["1", "2", "3", "4"])
    write_frames(tmp_path / "pred" / "c", ["1", "2", "4"], pred=True)
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", "1"]
    assert main(args) == 2
    line = error_line(capsys)
    assert "1 frame(s) of clip c (3)" in line and "--missing empty" in line
    assert main(args + ["--missing", "empty"]) == 0


def test_missing_clip_is_named(tmp_path, capsys):
    write_frames(tmp_path / "gt" / "c1", ["1", "2", "3"])
    write_frames(tmp_path / "gt" / "c2", ["1", "2", "3"])
    write_frames(tmp_path / "pred" / "c1", ["1", "2", "3"], pred=True)
    assert main(["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred")]) == 2
    assert "clip c2" in error_line(capsys)


def test_unreadable_image(tmp_path, capsys):
    write_frames(tmp_path / "gt" / "c", ["1", "2", "3"])
    write_frames(tmp_path / "pred" / "c", ["1", "2", "3"], pred=True)
    (tmp_path / "pred" / "c" / "2.png").write_bytes(b"not a png")
    assert main(["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", "1"]) == 2
    assert "cannot read image" in error_line(capsys)


def test_unreadable_image_in_worker_process(tmp_path, capsys):
    write_frames(tmp_path / "gt" / "c", ["1", "2", "3"])
    write_frames(tmp_path / "pred" / "c", ["1", "2", "3"], pred=True)
    (tmp_path / "gt" / "c" / "2.png").write_bytes(b"")
    assert main(["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", "2"]) == 2
    assert "cannot read image" in error_line(capsys)


def test_bad_sunseg_root_says_what_was_expected(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    assert main(["--split", "hard", "--data-root", str(tmp_path), "--pred-root", str(tmp_path / "pred")]) == 2
    assert "TestHardDataset/Unseen/GT" in error_line(capsys)


def test_gt_root_without_images(tmp_path, capsys):
    (tmp_path / "gt" / "empty_clip").mkdir(parents=True)
    (tmp_path / "pred").mkdir()
    assert main(["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred")]) == 2
    assert "expected images in" in error_line(capsys)


def test_argument_errors_are_one_line(tmp_path, capsys):
    assert main(["--gt-root", str(tmp_path)]) == 2  # no --pred-root
    error_line(capsys)
    assert main(["--pred-root", str(tmp_path)]) == 2  # neither --split nor --gt-root
    error_line(capsys)


def test_empty_ground_truth_frames_are_scored(tmp_path, capsys):
    folder = tmp_path / "gt" / "c"
    folder.mkdir(parents=True)
    for stem in ("1", "2", "3"):
        cv2.imwrite(str(folder / f"{stem}.png"), np.zeros((8, 8), np.uint8))
    write_frames(tmp_path / "pred" / "c", ["1", "2", "3"], shape=(8, 8), pred=True)
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--out-dir", str(tmp_path / "o")]
    assert main(args + ["--workers", "1"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["wFmeasure"] == 0 and 0 < summary["Smeasure"] < 1
