"""Frame dropping, clip weighting, natural order, caching (eval.protocol, eval.readers)."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from eval.metrics import SCALAR_NAMES, score_frame, summarize_curves
from eval.protocol import ClipScores, bootstrap_intervals, clip_cache_key, frames_to_score, score_clips, summarize
from eval.readers import Clip, find_gt_clips, frame_sort_key, match_predictions


def write_clip(root: Path, clip: str, n: int, value_of_frame=lambda i: 255, stem=lambda i: f"{i + 1:03d}"):
    """Clip of n 8x8 frames: gt has a 4x4 square, pred a square of grey value_of_frame(i)."""
    (root / "gt" / clip).mkdir(parents=True, exist_ok=True)
    (root / "pred" / clip).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gt = np.zeros((8, 8), np.uint8)
        gt[2:6, 2:6] = 255
        pred = np.zeros((8, 8), np.uint8)
        pred[2:6, 2 + i % 3 : 6 + i % 3] = value_of_frame(i)
        cv2.imwrite(str(root / "gt" / clip / f"{stem(i)}.png"), gt)
        cv2.imwrite(str(root / "pred" / clip / f"{stem(i)}.png"), pred)


def test_natural_sort_by_trailing_frame_number():
    names = ["case1_3_a_10.jpg", "case1_3_a_2.jpg", "case1_3_a_1.jpg", "case1_3_b_3.jpg"]
    ordered = [p.name for p in sorted(map(Path, names), key=frame_sort_key)]
    assert ordered == ["case1_3_a_1.jpg", "case1_3_a_2.jpg", "case1_3_b_3.jpg", "case1_3_a_10.jpg"]
    assert [p.name for p in sorted(map(Path, ["10.png", "9.png", "100.png"]), key=frame_sort_key)] == [
        "9.png", "10.png", "100.png",
    ]  # fmt: skip


def test_video_protocol_drops_first_and_last_frame():
    clip = Clip("c", [Path(f"{i}.png") for i in range(5)], [Path(f"p{i}.png") for i in range(5)])
    kept = frames_to_score(clip, "video")
    assert [p.name for p in kept.gt_frames] == ["1.png", "2.png", "3.png"]
    assert [p.name for p in kept.predictions] == ["p1.png", "p2.png", "p3.png"]
    assert frames_to_score(clip, "image").gt_frames == clip.gt_frames


def test_every_clip_weighs_the_same():
    one = ClipScores("a", np.zeros((1, len(SCALAR_NAMES))), np.zeros((1, 6, 256)))
    many = ClipScores("b", np.ones((9, len(SCALAR_NAMES))), np.ones((9, 6, 256)))
    summary = summarize([one, many])
    assert summary["Smeasure"] == pytest.approx(0.5)
    assert summary["maxDice"] == pytest.approx(0.5)


def test_max_is_taken_on_the_averaged_curve():
    curves_a = np.zeros((1, 6, 256))
    curves_b = np.zeros((1, 6, 256))
    curves_a[0, 4, 10] = 1.0  # Dice peaks at different thresholds in the two clips
    curves_b[0, 4, 20] = 1.0
    scalars = np.zeros((1, len(SCALAR_NAMES)))
    summary = summarize([ClipScores("a", scalars, curves_a), ClipScores("b", scalars, curves_b)])
    assert summary["maxDice"] == pytest.approx(0.5)
    assert summary["meanDice"] == pytest.approx(1 / 256)


def test_clip_scores_match_per_frame_average(tmp_path):
    write_clip(tmp_path, "c1", 6, value_of_frame=lambda i: 80 + 30 * i)
    write_clip(tmp_path, "c2", 3)
    clips = find_gt_clips(tmp_path / "gt")
    assert match_predictions(clips, tmp_path / "pred") == []
    scored = score_clips(clips, "video")
    assert [c.n_frames for c in scored] == [4, 1]
    frames = []
    for gt, pred in zip(clips[0].gt_frames[1:-1], clips[0].predictions[1:-1]):
        frames.append(score_frame(cv2.imread(str(pred), 0), cv2.imread(str(gt), 0)))
    expected = summarize_curves(np.mean([f.scalars for f in frames], 0), np.mean([f.curves for f in frames], 0))
    clip_one = summarize([scored[0]])
    for key, value in expected.items():
        assert clip_one[key] == pytest.approx(value, abs=1e-12), key


def test_parallel_equals_serial_and_cache_is_reused(tmp_path, eval_workers_for_few_frames):
    for c in range(3):
        write_clip(tmp_path, f"clip{c}", 5 + c, value_of_frame=lambda i: 60 + 20 * i)
    clips = find_gt_clips(tmp_path / "gt")
    match_predictions(clips, tmp_path / "pred")
    serial = score_clips(clips, "video", workers=1, cache_dir=tmp_path / "cache")
    for workers in (2, 3):  # two threads of this process; and a spawned worker beside them
        parallel = score_clips(clips, "video", workers=workers)
        assert [c.name for c in parallel] == [c.name for c in serial]
        for a, b in zip(serial, parallel):
            np.testing.assert_array_equal(a.scalars, b.scalars)
            np.testing.assert_array_equal(a.curves, b.curves)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3
    # a cached clip is read back, not recomputed: poison the cache and see it returned
    cached = np.load(tmp_path / "cache" / "clip0.npz")
    poisoned = {name: cached[name] for name in cached.files}
    np.savez(tmp_path / "cache" / "clip0.npz", **{**poisoned, "scalars": cached["scalars"] + 1})
    again = score_clips(clips, "video", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again[0].scalars, serial[0].scalars + 1)


def test_two_lanes_are_threads_of_this_process(tmp_path, monkeypatch, eval_workers_for_few_frames):
    import threading
    import time

    import eval.protocol

    for c in range(2):
        write_clip(tmp_path, f"clip{c}", 20)
    clips = find_gt_clips(tmp_path / "gt")
    match_predictions(clips, tmp_path / "pred")
    score_task, threads = eval.protocol._score_task, set()

    def recording_task(task):
        threads.add(threading.get_ident())
        time.sleep(0.05)  # tiny frames score in microseconds: keep a task running while the next is submitted
        return score_task(task)

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker process was started for two lanes")

    monkeypatch.setattr(eval.protocol, "ProcessPoolExecutor", no_pool)
    monkeypatch.setattr(eval.protocol, "_score_task", recording_task)
    scored = score_clips(clips, "video", workers=2)
    assert [c.n_frames for c in scored] == [18, 18] and len(threads) == 2


def test_small_jobs_start_no_worker_process(tmp_path, monkeypatch):
    import eval.protocol

    write_clip(tmp_path, "c", 6)
    clips = find_gt_clips(tmp_path / "gt")
    match_predictions(clips, tmp_path / "pred")

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker process was started for 4 frames")

    monkeypatch.setattr(eval.protocol, "ProcessPoolExecutor", no_pool)
    assert [c.n_frames for c in score_clips(clips, "video", workers=8)] == [4]


@pytest.mark.parametrize("load, runnable, expected", [
    (0.0, None, 8), (2.6, None, 5), (7.9, None, 1), (30.0, None, 1),
    (2.6, 0, 8),  # the average still counts a job that has ended: nothing else runs now
    (7.9, 3, 5), (2.6, 6, 5),  # the fewer of the two counts
])
def test_default_workers_are_the_idle_cores(monkeypatch, load, runnable, expected):
    import os

    import eval.protocol
    from eval.protocol import idle_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(eval.protocol, "other_runnable_now", lambda: runnable)
    assert idle_cores() == expected


def test_runnable_tasks_are_read_from_proc():
    from eval.protocol import other_runnable_now

    now = other_runnable_now()
    assert now is None or now >= 0


def test_cache_key_changes_with_files_and_protocol(tmp_path):
    write_clip(tmp_path, "c", 4)
    clip = find_gt_clips(tmp_path / "gt")[0]
    match_predictions([clip], tmp_path / "pred")
    key = clip_cache_key(clip, "video")
    assert clip_cache_key(clip, "image") != key
    cv2.imwrite(str(clip.predictions[1]), np.full((8, 8), 7, np.uint8))
    assert clip_cache_key(clip, "video") != key


def test_masks_subfolder_layout(tmp_path):
    (tmp_path / "01" / "masks").mkdir(parents=True)
    (tmp_path / "01" / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "01" / "masks" / "001.png"), np.zeros((4, 4), np.uint8))
    cv2.imwrite(str(tmp_path / "01" / "frames" / "001.png"), np.zeros((4, 4), np.uint8))
    clips = find_gt_clips(tmp_path)
    assert [(c.name, [p.parent.name for p in c.gt_frames]) for c in clips] == [("01", ["masks"])]


def _kill_on_clip_two(task):
    """A worker task that dies like an OOM-killed process (SIGKILL) on clip "c2", once clip "c1" is cached."""
    import multiprocessing
    import os
    import signal
    import time

    from eval import protocol

    clip_name = task[0]
    # only in a worker: the main process scores tasks too when the workers' queues are full
    if clip_name == "c2" and multiprocessing.parent_process() is not None:
        cache = Path(os.environ["VPS_EVAL_TEST_CACHE"])
        deadline = time.monotonic() + 120
        while not (cache / "c1.npz").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return protocol._score_task(task)  # in a spawned worker eval.protocol is not patched: the real task


def test_killed_worker_stops_with_one_line_and_keeps_finished_clips(tmp_path, monkeypatch, capsys, eval_workers_for_few_frames):
    import eval.protocol
    from eval.cli import main

    write_clip(tmp_path, "c1", 4)
    write_clip(tmp_path, "c2", 4)
    out = tmp_path / "out"
    cache = out / ".cache" / "pred"
    monkeypatch.setenv("VPS_EVAL_TEST_CACHE", str(cache))
    # the main process submits _kill_on_clip_two; spawned workers import it from this module
    monkeypatch.setattr(eval.protocol, "_score_task", _kill_on_clip_two)
    args = ["--gt-root", str(tmp_path / "gt"), "--pred-root", str(tmp_path / "pred"), "--out-dir", str(out)]
    assert main(args + ["--workers", "3"]) == 1  # two threads here, one spawned worker
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vps-eval: error: a worker process died"), err
    assert sorted(p.name for p in cache.glob("*.npz")) == ["c1.npz"]
    monkeypatch.undo()
    assert main(args + ["--workers", "1"]) == 0


def test_image_protocol_summary_is_the_mean_over_all_images():
    small = ClipScores("a", np.zeros((1, len(SCALAR_NAMES))), np.zeros((1, 6, 256)))
    large = ClipScores("b", np.ones((3, len(SCALAR_NAMES))), np.ones((3, 6, 256)))
    assert summarize([small, large], "image")["Smeasure"] == pytest.approx(0.75)
    assert summarize([small, large], "video")["Smeasure"] == pytest.approx(0.5)


def test_frame_number_is_the_last_number_and_unnumbered_names_sort_last():
    names = ["cover.png", "12_mask.png", "3_mask.png", "img_20.png"]
    assert [p.name for p in sorted(map(Path, names), key=frame_sort_key)] == [
        "3_mask.png", "12_mask.png", "img_20.png", "cover.png",
    ]  # fmt: skip


def constant_clip(name: str, value: float, frames: int) -> ClipScores:
    return ClipScores(name, np.full((frames, len(SCALAR_NAMES)), value), np.full((frames, 6, 256), value))


def test_bootstrap_draws_clips_in_the_video_protocol_and_frames_in_the_image_protocol():
    clips = [constant_clip("good", 1.0, 10), constant_clip("bad", 0.0, 10)]
    video = bootstrap_intervals(clips, "video", resamples=400, seed=1)
    image = bootstrap_intervals(clips, "image", resamples=400, seed=1)
    # two clips: a resample draws both good (1), both bad (0) or one of each (0.5), each often enough
    assert video["maxDice"] == (pytest.approx(0.0), pytest.approx(1.0))
    # twenty frames: the resampled share of good frames stays near one half
    low, high = image["maxDice"]
    assert 0.2 < low < 0.5 < high < 0.8
    assert bootstrap_intervals(clips, "image", resamples=400, seed=1) == image  # seeded
    assert bootstrap_intervals(clips, "image", resamples=400, seed=2) != image


def test_bootstrap_of_identical_units_is_the_estimate_and_intervals_hold_it():
    same = [constant_clip(str(i), 0.7, 3) for i in range(4)]
    low, high = bootstrap_intervals(same, "video", resamples=50)["Smeasure"]
    assert low == pytest.approx(0.7) and high == pytest.approx(0.7)
    rng = np.random.default_rng(0)
    mixed = [ClipScores(str(i), rng.uniform(size=(3, len(SCALAR_NAMES))), rng.uniform(size=(3, 6, 256)))
             for i in range(8)]
    estimate = summarize(mixed, "video")
    # averages (a max over noisy thresholds picks the best threshold of each resample and leans high)
    for key, (low, high) in bootstrap_intervals(mixed, "video", resamples=300).items():
        if not key.startswith("max"):
            assert low < estimate[key] < high, key
