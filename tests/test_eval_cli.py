"""vps-eval end to end on small synthetic data, and its one-line errors (exit status 2)."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from eval.cli import main
from eval.metrics import score_frame, summarize_curves


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


def test_bootstrap_prints_and_writes_intervals_and_paired_differences(tmp_path, capsys):
    stems = [str(i) for i in range(8)]
    write_frames(tmp_path / "gt", stems)
    for method, poor in (("a", 3), ("b", 3), ("c", 6)):  # b is a copy of a; c has more poor predictions
        write_frames(tmp_path / method, stems[:8 - poor], pred=True)
        write_frames(tmp_path / method, stems[8 - poor:], pred=True, shift=6)
    args = ["--gt-root", str(tmp_path / "gt"), "--protocol", "image", "--workers", "1", "--out-dir",
            str(tmp_path / "o"), "--bootstrap", "300", "--methods", *[str(tmp_path / m) for m in "abc"]]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "95 % intervals (bootstrap, 300 resamples of the frames)" in printed
    assert "minus a, paired (the same draws), 95 % intervals" in printed
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    intervals = pd.read_csv(tmp_path / "o" / "intervals.csv").set_index(["method", "metric"])
    assert set(intervals.loc["a"].index) == set(summary["a"])
    dice = intervals.loc[("a", "maxDice")]
    assert dice["estimate"] == pytest.approx(summary["a"]["maxDice"])
    assert dice["low"] < dice["estimate"] < dice["high"]
    differences = pd.read_csv(tmp_path / "o" / "differences.csv").set_index(["method", "metric"])
    assert set(differences.index.get_level_values("method")) == {"b", "c"}
    same = differences.loc["b"]
    assert (same[["estimate", "low", "high"]].abs() < 1e-12).all().all()  # the same maps: no difference in any draw
    worse = differences.loc[("c", "Dice@0.5")]
    assert worse["estimate"] == pytest.approx(summary["c"]["Dice@0.5"] - summary["a"]["Dice@0.5"])
    assert worse["low"] <= worse["estimate"] <= worse["high"] < 0
    assert main(args[:args.index("--bootstrap") + 1] + ["0"] + args[args.index("--bootstrap") + 2:]) == 2
    assert "--bootstrap" in error_line(capsys)


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


@pytest.mark.parametrize("workers", ["2", "3"])  # in a thread of this process; in a spawned worker
def test_unreadable_image_in_worker_process(tmp_path, capsys, eval_workers_for_few_frames, workers):
    write_frames(tmp_path / "gt" / "c", ["1", "2", "3"])
    write_frames(tmp_path / "pred" / "c", ["1", "2", "3"], pred=True)
    (tmp_path / "gt" / "c" / "2.png").write_bytes(b"")
    assert main(["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", workers]) == 2
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


# ---- toolbox conventions: resize, duplicates, 16-bit, layouts, weighting, frame names, workers ----------

TOOLBOX_KEYS = (
    "Smeasure", "wFmeasure", "MAE", "adpEm", "meanEm", "maxEm", "adpFm", "meanFm", "maxFm",
    "meanSen", "maxSen", "meanSpe", "maxSpe", "meanDice", "maxDice", "meanIoU", "maxIoU",
)  # fmt: skip


def toolbox_rates(pred, gt):
    """The SUN-SEG toolbox's Sen, Spe, Dice, IoU loop over linspace(1, 0, 256), (4, 256)."""
    out = np.zeros((4, 256))
    n_obj = gt.sum()
    for k, threshold in enumerate(np.linspace(1, 0, 256)):
        label = pred >= threshold
        n_and = (label & gt).sum()
        if n_and == 0:
            continue
        n_rec = label.sum()
        fn, fp = n_obj - n_and, n_rec - n_and
        tn = (~label).sum() - fn
        spe = tn / (tn + fp) if tn + fp else 0.0
        out[:, k] = [n_and / n_obj, spe, 2 * n_and / (n_obj + n_rec), n_and / (fn + n_rec)]
    return out


def toolbox_video_reference(gt_root, pred_root):
    """The VPS toolbox's video evaluation, literally: per clip, frames in numeric order without the first
    and last; uint8 prediction resized with cv2.resize(pred, (gt_w, gt_h)); pysodmetrics per clip; the
    dataset value is the mean over clips, max/mean taken on the clip-averaged curves."""
    import warnings

    psm = pytest.importorskip("py_sod_metrics")
    per_clip = []
    for clip in sorted(p for p in gt_root.iterdir() if p.is_dir()):
        frames = sorted(clip.glob("*.png"), key=lambda p: int(p.stem))[1:-1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sm, wfm, mae, em, fm = psm.Smeasure(), psm.WeightedFmeasure(), psm.MAE(), psm.Emeasure(), psm.Fmeasure()
        rates = []
        for gt_path in frames:
            gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
            pred = cv2.imread(str(pred_root / clip.name / gt_path.name), cv2.IMREAD_GRAYSCALE)
            if pred.shape != gt.shape:
                pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]))
            for metric in (sm, wfm, mae, em, fm):
                metric.step(pred, gt)
            rates.append(toolbox_rates(*psm.utils.prepare_data(pred, gt)))
        e, f = em.get_results()["em"], fm.get_results()["fm"]
        curves = {"Em": e["curve"], "Fm": f["curve"]}
        curves.update(zip(("Sen", "Spe", "Dice", "IoU"), np.mean(rates, axis=0)))
        scalars = {"Smeasure": sm.get_results()["sm"], "wFmeasure": wfm.get_results()["wfm"],
                   "MAE": mae.get_results()["mae"], "adpEm": e["adp"], "adpFm": f["adp"]}
        per_clip.append((scalars, curves))
    out = {key: np.mean([s[key] for s, _ in per_clip]) for key in per_clip[0][0]}
    for name in per_clip[0][1]:
        curve = np.mean([c[name] for _, c in per_clip], axis=0)
        out[f"mean{name}"], out[f"max{name}"] = curve.mean(), curve.max()
    return out


def write_resized_clip(root, clip, n, gt_shape, pred_shape, seed):
    """n frames: gt an ellipse that moves, pred a blurred noisy ellipse at another size."""
    rng = np.random.default_rng(seed)
    (root / "gt" / clip).mkdir(parents=True)
    (root / "pred" / clip).mkdir(parents=True)
    h, w = gt_shape
    for i in range(n):
        gt = np.zeros(gt_shape, np.uint8)
        cv2.ellipse(gt, (w // 2 + i - n // 2, h // 2), (w // 4, h // 5), 0, 0, 360, 255, -1)
        pred = cv2.resize(gt, (pred_shape[1], pred_shape[0]), interpolation=cv2.INTER_AREA).astype(np.float32)
        pred = cv2.GaussianBlur(np.roll(pred, int(rng.integers(-2, 3)), axis=1), (0, 0), 1.5)
        pred = np.clip(pred * rng.uniform(0.6, 1.0) + rng.normal(0, 12, pred_shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "gt" / clip / f"{i + 1:03d}.png"), gt)
        cv2.imwrite(str(root / "pred" / clip / f"{i + 1:03d}.png"), pred)


def test_resized_predictions_match_the_toolbox_on_every_metric(tmp_path, capsys):
    # predictions at another size than the ground truth: the toolbox resizes the uint8 map first
    write_resized_clip(tmp_path, "a", 5, gt_shape=(57, 50), pred_shape=(47, 47), seed=1)
    write_resized_clip(tmp_path, "b", 6, gt_shape=(40, 64), pred_shape=(31, 33), seed=2)
    write_resized_clip(tmp_path, "c", 4, gt_shape=(36, 30), pred_shape=(72, 61), seed=3)
    write_resized_clip(tmp_path, "d", 4, gt_shape=(33, 45), pred_shape=(33, 45), seed=4)  # same size
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--out-dir", str(tmp_path / "o")]
    assert main(args + ["--workers", "1"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    expected = toolbox_video_reference(tmp_path / "gt", tmp_path / "pred")
    assert set(expected) == set(TOOLBOX_KEYS)
    for key in TOOLBOX_KEYS:
        assert summary[key] == pytest.approx(expected[key], abs=1e-6), key


def test_two_predictions_with_one_stem_are_an_error(tmp_path, capsys):
    write_frames(tmp_path / "gt" / "c", ["001", "002", "003", "004"])
    write_frames(tmp_path / "pred" / "c", ["001", "002", "003", "004"], pred=True)
    cv2.imwrite(str(tmp_path / "pred" / "c" / "003.jpg"), np.zeros((16, 20), np.uint8))
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", "1"]
    assert main(args) == 2
    line = error_line(capsys)
    assert "003.jpg" in line and "003.png" in line and "clip c" in line


def test_two_ground_truth_frames_with_one_stem_are_an_error(tmp_path, capsys):
    write_frames(tmp_path / "gt" / "c", ["001", "002", "003"])
    cv2.imwrite(str(tmp_path / "gt" / "c" / "002.bmp"), np.zeros((16, 20), np.uint8))
    write_frames(tmp_path / "pred" / "c", ["001", "002", "003"], pred=True)
    assert main(["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", "1"]) == 2
    line = error_line(capsys)
    assert "002.bmp" in line and "002.png" in line


def run_summary(tmp_path, gt_root, pred_root, out, *extra):
    args = ["--gt-root", str(gt_root), "--pred-root", str(pred_root), "--out-dir", str(tmp_path / out), "--all"]
    assert main(args + ["--workers", "1", *extra]) == 0
    return json.loads((tmp_path / out / "summary.json").read_text())


def warning_lines(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    return [line for line in lines if line.startswith("vps-eval: warning: ")]


def write_16_bit_predictions(tmp_path, widen) -> dict:
    """Clip ``c`` with ground truth, 8-bit predictions (``pred8``) and their 16-bit copies ``widen(image)``
    (``pred16``); returns the 16-bit arrays by stem."""
    stems = ["1", "2", "3", "4"]
    write_frames(tmp_path / "gt" / "c", stems)
    write_frames(tmp_path / "pred8" / "c", stems, pred=True)
    (tmp_path / "pred16" / "c").mkdir(parents=True)
    wide = {}
    for stem in stems:
        image = cv2.imread(str(tmp_path / "pred8" / "c" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
        wide[stem] = widen(image)
        cv2.imwrite(str(tmp_path / "pred16" / "c" / f"{stem}.png"), wide[stem])
    return wide


def test_16_bit_predictions_holding_8_bit_values_are_read_as_8_bit(tmp_path, capsys):
    write_16_bit_predictions(tmp_path, lambda image: image.astype(np.uint16))
    assert cv2.imread(str(tmp_path / "pred16" / "c" / "2.png"), cv2.IMREAD_GRAYSCALE).max() == 0  # what >> 8 gives
    eight = run_summary(tmp_path, tmp_path / "gt", tmp_path / "pred8", "o8")
    capsys.readouterr()
    sixteen = run_summary(tmp_path, tmp_path / "gt", tmp_path / "pred16", "o16")
    assert sixteen == eight
    warnings = warning_lines(capsys)
    assert len(warnings) == 1, warnings
    assert "16-bit holding 8-bit values" in warnings[0] and "2 prediction image(s)" in warnings[0]  # 2 scored frames


def test_full_range_16_bit_predictions_are_scaled_like_the_toolbox(tmp_path, capsys):
    wide = write_16_bit_predictions(tmp_path, lambda image: image.astype(np.uint16) * 257 + 100)  # 0..65535 range
    for stem, values in wide.items():
        # the toolbox's reader (cv2.IMREAD_GRAYSCALE) maps 16 to 8 bits by value >> 8
        cv2.imwrite(str(tmp_path / "pred8" / "c" / f"{stem}.png"), (values >> 8).astype(np.uint8))
    eight = run_summary(tmp_path, tmp_path / "gt", tmp_path / "pred8", "o8")
    sixteen = run_summary(tmp_path, tmp_path / "gt", tmp_path / "pred16", "o16")
    assert sixteen == eight
    assert warning_lines(capsys) == []


def test_ground_truth_saved_as_0_1_warns_once_per_clip(tmp_path, capsys):
    stems = ["1", "2", "3", "4"]
    for clip in ("binary01", "fine"):
        write_frames(tmp_path / "gt" / clip, stems)
        write_frames(tmp_path / "pred" / clip, stems, pred=True)
    for stem in stems:
        path = tmp_path / "gt" / "binary01" / f"{stem}.png"
        cv2.imwrite(str(path), (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8))
    out = tmp_path / "o"
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--out-dir", str(out)]
    assert main(args + ["--workers", "1"]) == 0
    warnings = warning_lines(capsys)
    assert len(warnings) == 1
    assert "no ground-truth pixel is above 128 in clip binary01" in warnings[0]
    per_clip = pd.read_csv(out / "per_clip.csv").set_index("clip")
    assert per_clip.loc["binary01", "maxDice"] == 0 and per_clip.loc["binary01", "maxFm"] == 0  # the toolbox's number
    assert per_clip.loc["fine", "maxDice"] > 0.5
    # a rerun reads the clips from the cache and still warns
    assert main(args + ["--workers", "1"]) == 0
    assert len(warning_lines(capsys)) == 1


def write_kvasir_root(root, stems):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in stems:  # RGB photos: never ground truth
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
    write_frames(root / "masks", stems)


@pytest.mark.parametrize("protocol", ["image", "video"])
def test_kvasir_style_root_uses_its_masks(tmp_path, capsys, protocol):
    stems = ["cju01", "cju02", "cju03", "cju04"]
    write_kvasir_root(tmp_path / "Kvasir", stems)
    write_frames(tmp_path / "pred", stems, pred=True, shift=1)
    extra = ["--protocol", protocol, "--missing", "empty"]
    expected = run_summary(tmp_path, tmp_path / "Kvasir" / "masks", tmp_path / "pred", "direct", *extra)
    capsys.readouterr()
    assert run_summary(tmp_path, tmp_path / "Kvasir", tmp_path / "pred", "root", *extra) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("vps-eval: note: ") and "masks" in err[0]  # and "results written"
    assert ("--protocol image" in err[0]) == (protocol == "video")


def test_image_protocol_weighs_every_image_the_same(tmp_path, capsys):
    # clip a: 1 good frame, clip b: 5 poor frames -> the mean over images differs from the mean over clips
    write_frames(tmp_path / "gt" / "a", ["1"])
    write_frames(tmp_path / "pred" / "a", ["1"], pred=True)
    write_frames(tmp_path / "gt" / "b", ["1", "2", "3", "4", "5"])
    write_frames(tmp_path / "pred" / "b", ["1", "2", "3", "4", "5"], pred=True, shift=5)
    summary = run_summary(tmp_path, tmp_path / "gt", tmp_path / "pred", "o", "--protocol", "image")
    frames = []
    for clip, n in (("a", 1), ("b", 5)):
        for stem in map(str, range(1, n + 1)):
            pred = cv2.imread(str(tmp_path / "pred" / clip / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
            gt = cv2.imread(str(tmp_path / "gt" / clip / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
            frames.append(score_frame(pred, gt))
    per_image = summarize_curves(np.mean([f.scalars for f in frames], 0), np.mean([f.curves for f in frames], 0))
    clip_means = [
        (np.mean([f.scalars for f in part], 0), np.mean([f.curves for f in part], 0))
        for part in (frames[:1], frames[1:])
    ]
    per_clip = summarize_curves(*(np.mean(x, 0) for x in zip(*clip_means)))
    for key in TOOLBOX_KEYS + ("Dice@0.5", "IoU@0.5"):
        assert summary[key] == pytest.approx(per_image[key], abs=1e-12), key
    assert abs(per_image["Smeasure"] - per_clip["Smeasure"]) > 0.01
    assert abs(per_image["maxDice"] - per_clip["maxDice"]) > 0.01


def test_hidden_and_macos_resource_files_are_ignored(tmp_path, capsys):
    stems = ["001", "002", "003", "004"]
    write_frames(tmp_path / "gt" / "c", stems)
    write_frames(tmp_path / "pred" / "c", stems, pred=True)
    expected = run_summary(tmp_path, tmp_path / "gt", tmp_path / "pred", "clean")
    for folder in (tmp_path / "gt" / "c", tmp_path / "pred" / "c"):
        (folder / "._005.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # would be the last frame
        (folder / "._002.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # same stem as a real frame
        cv2.imwrite(str(folder / ".hidden_006.png"), np.zeros((16, 20), np.uint8))
    (tmp_path / "gt" / ".cache").mkdir()
    write_frames(tmp_path / "gt" / ".cache", stems)  # a hidden folder is not a clip
    assert run_summary(tmp_path, tmp_path / "gt", tmp_path / "pred", "dirty") == expected
    per_clip = pd.read_csv(tmp_path / "dirty" / "per_clip.csv")
    assert per_clip["clip"].tolist() == ["c"] and per_clip["n_frames"].tolist() == [2]


def test_unnumbered_frame_names_are_an_error_in_the_video_protocol(tmp_path, capsys):
    stems = ["frame_1", "frame_2", "frame_3", "frame_4", "cover"]
    write_frames(tmp_path / "gt" / "c", stems)
    write_frames(tmp_path / "pred" / "c", stems, pred=True)
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", "1"]
    assert main(args) == 2
    line = error_line(capsys)
    assert "cover.png" in line and "clip c" in line and "frame order" in line
    assert main(args + ["--protocol", "image"]) == 0  # order does not matter there


@pytest.mark.parametrize("workers", ["-3", "0", "two"])
def test_bad_worker_count_is_an_argument_error(tmp_path, capsys, workers):
    write_frames(tmp_path / "gt" / "c", ["1", "2", "3"])
    write_frames(tmp_path / "pred" / "c", ["1", "2", "3"], pred=True)
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--workers", workers]
    assert main(args) == 2
    assert "--workers" in error_line(capsys)
