"""Evaluation protocols: which frames count and how frame scores are averaged.

* video (SUN-SEG / VPS toolbox): frames in playing order (every frame name must carry a frame
  number), the first and the last frame of every clip dropped, scores averaged over a clip's
  frames, then every clip weighs the same;
* image (Kvasir, CVC-ClinicDB, ...): nothing dropped, every image weighs the same over the whole
  dataset (the mean over all images of all clips).

A dataset's curves are the average of its clips' curves (video) or of all its frames' curves
(image); ``max*`` / ``mean*`` are taken on that averaged curve (see
:func:`eval.metrics.summarize_curves`).
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.metrics import CURVE_NAMES, SCALAR_NAMES, FrameScores, score_frame, score_frames, summarize_curves
from eval.readers import Clip, EvalInputError, frame_number, read_grey_checked, warn

PROTOCOLS = ("video", "image")
CACHE_VERSION = "2"  # 2: resized predictions are resized as uint8; gt_max and flags are cached
FRAMES_PER_TASK = 8
# starting a worker process costs about as much CPU as scoring this many frames: smaller jobs use fewer
FRAMES_PER_PROCESS = 100
MAIN_PROCESS_THREADS = 2  # this process's threads beside the spawned workers
# per-frame input flags (ClipScores.flags): 16-bit images that held 8-bit values
PRED_16BIT_AS_8BIT = 1
GT_16BIT_AS_8BIT = 2
GT_THRESHOLD = 128  # the toolbox's ground truth is gt > 128


class WorkerDiedError(RuntimeError):
    """A worker process died (killed, e.g. by the OOM killer); the CLI prints one line, exit status 1."""


@dataclass
class ClipScores:
    """Per-frame scores of one clip: scalars float64 (F, n_scalars), curves float64 (F, n_curves, 256).

    gt_max: int (F,), the largest ground-truth value of each frame (-1: unknown); flags: int (F,),
    bits PRED_16BIT_AS_8BIT / GT_16BIT_AS_8BIT.
    """

    name: str
    scalars: np.ndarray
    curves: np.ndarray
    gt_max: np.ndarray | None = None
    flags: np.ndarray | None = None

    def __post_init__(self):
        if self.gt_max is None:
            self.gt_max = np.full(len(self.scalars), -1, np.int64)
        if self.flags is None:
            self.flags = np.zeros(len(self.scalars), np.int64)

    @property
    def n_frames(self) -> int:
        return len(self.scalars)

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        """Clip averages: scalars (n_scalars,), curves (n_curves, 256)."""
        return self.scalars.mean(axis=0), self.curves.mean(axis=0)


def check_frame_order(clip: Clip) -> None:
    """Raise EvalInputError when some frame names of the clip carry no number: the playing order, and so
    which frames are first and last, is unknown."""
    unnumbered = [p.name for p in clip.gt_frames if frame_number(p) is None]
    if unnumbered:
        shown = ", ".join(unnumbered[:3]) + (", ..." if len(unnumbered) > 3 else "")
        raise EvalInputError(
            f"clip {clip.name}: frame order unknown, {len(unnumbered)} of {len(clip.gt_frames)} frame name(s) "
            f"carry no frame number ({shown}); the video protocol drops each clip's first and last frame, "
            f"so name frames with their number (or use --protocol image)"
        )


def frames_to_score(clip: Clip, protocol: str) -> Clip:
    """The clip restricted to the frames the protocol scores (video: without first and last).

    Raises EvalInputError (video protocol) when some frame names carry no number (see check_frame_order).
    """
    if protocol == "video":
        check_frame_order(clip)
        return Clip(clip.name, clip.gt_frames[1:-1], clip.predictions[1:-1])
    return clip


def read_file_pair(gt_path: Path, pred_path: Path | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(pred uint8, gt uint8, flags) of one frame; a missing prediction (None) is an empty one."""
    gt, gt_16 = read_grey_checked(gt_path)
    if pred_path is None:
        pred, pred_16 = np.zeros_like(gt), False
    else:
        pred, pred_16 = read_grey_checked(pred_path)
    return pred, gt, PRED_16BIT_AS_8BIT * pred_16 | GT_16BIT_AS_8BIT * gt_16


def score_file_pair(gt_path: Path, pred_path: Path | None) -> FrameScores:
    """Scores of one frame read from disk; a missing prediction (None) counts as an empty one."""
    pred, gt, _ = read_file_pair(gt_path, pred_path)
    return score_frame(pred, gt)


def _file_signature(path: Path | None) -> str:
    if path is None:
        return "missing"
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"


def clip_cache_key(clip: Clip, protocol: str) -> str:
    """Hash of the clip's gt/pred paths, mtimes and sizes and the protocol."""
    digest = hashlib.sha1(f"{CACHE_VERSION}|{protocol}".encode())
    for gt, pred in zip(clip.gt_frames, clip.predictions):
        digest.update(f"{_file_signature(gt)}>{_file_signature(pred)}\n".encode())
    return digest.hexdigest()


class ClipCache:
    """Per-clip npz files ``<folder>/<clip>.npz`` holding scores and the key they were made with."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None

    def _path(self, clip_name: str) -> Path:
        return self.folder / f"{clip_name}.npz"

    def load(self, clip_name: str, key: str | None) -> ClipScores | None:
        if self.folder is None or not self._path(clip_name).is_file():
            return None
        try:
            with np.load(self._path(clip_name)) as data:
                if str(data["key"]) != key:
                    return None
                return ClipScores(clip_name, data["scalars"], data["curves"], data["gt_max"], data["flags"])
        except (OSError, ValueError, KeyError):  # a half-written file from an interrupted run
            return None

    def save(self, scores: ClipScores, key: str | None) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{scores.name}.tmp.npz"
        np.savez(tmp, key=key, scalars=scores.scalars, curves=scores.curves, gt_max=scores.gt_max, flags=scores.flags)
        os.replace(tmp, self._path(scores.name))  # atomic: an interruption never leaves a torn file


def _score_task(task):
    """Worker: (clip name, first frame index, [(gt, pred), ...]) -> ClipScores of those frames and the index."""
    clip_name, start, pairs = task
    frames = [read_file_pair(gt_path, pred_path) for gt_path, pred_path in pairs]
    scalars, curves = score_frames((pred, gt) for pred, gt, _ in frames)
    gt_max = np.array([int(gt.max()) for _, gt, _ in frames], np.int64)
    flags = np.array([frame_flags for _, _, frame_flags in frames], np.int64)
    return start, ClipScores(clip_name, scalars, curves, gt_max, flags)


def _init_worker():
    import signal

    import cv2

    cv2.setNumThreads(1)  # processes already use every core
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it cancels and waits


def _make_tasks(clips: list[Clip]):
    for clip in clips:
        pairs = list(zip(clip.gt_frames, clip.predictions))
        for start in range(0, len(pairs), FRAMES_PER_TASK):
            yield clip.name, start, pairs[start : start + FRAMES_PER_TASK]


@contextmanager
def _opencv_threads(n: int):
    """OpenCV's thread count set to ``n`` for a while: with worker processes beside it, this
    process's own OpenCV threads would only compete with them."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _finished(pending: set) -> list:
    done = [future for future in pending if future.done()]
    pending.difference_update(done)
    return [future.result() for future in done]


def _share_tasks(executor, tasks, helpers: int, threads: int):
    """Results of ``_score_task`` over ``tasks`` in completion order, from ``helpers`` worker
    processes and from ``threads`` threads of this process: each holds at most two tasks (one
    running, one queued). This process scores from the start, while the workers are still
    starting up, to the end; its threads overlap one task's decoding (OpenCV releases the GIL)
    with another's scoring."""
    remote, local = set(), set()
    own = ThreadPoolExecutor(threads)
    try:
        for task in tasks:
            while True:
                yield from _finished(remote)
                yield from _finished(local)
                if len(remote) < 2 * helpers:
                    remote.add(executor.submit(_score_task, task))
                    break
                if len(local) < 2 * threads:
                    local.add(own.submit(_score_task, task))
                    break
                wait(remote | local, return_when=FIRST_COMPLETED)
        for future in as_completed(remote | local):
            yield future.result()
    finally:
        own.shutdown(wait=True, cancel_futures=True)


def _run_tasks(tasks, workers: int):
    """Results of ``_score_task`` over ``tasks`` in completion order, in ``workers`` lanes: up to
    MAIN_PROCESS_THREADS threads of this process (nothing to start: on a small job a spawned
    process costs as much as it saves), then ``workers - MAIN_PROCESS_THREADS`` spawned processes.

    A worker that dies (SIGKILL from the OOM killer, a crash) raises WorkerDiedError instead of
    hanging; an exception in a task (e.g. an unreadable image) is raised as it is. Either way the
    tasks not yet started are cancelled.
    """
    if workers <= 1:
        yield from map(_score_task, tasks)
        return
    threads = min(MAIN_PROCESS_THREADS, workers)
    helpers = workers - threads
    if helpers == 0:
        with _opencv_threads(1):
            yield from _share_tasks(None, tasks, 0, threads)
        return
    # spawn, not fork: a fork after OpenCV's thread pool has run can deadlock the children
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(helpers, mp_context=context, initializer=_init_worker)
    try:
        with _opencv_threads(1):
            yield from _share_tasks(executor, tasks, helpers, threads)
    except BrokenProcessPool as error:
        raise WorkerDiedError(
            "a worker process died (killed, e.g. out of memory): finished clips are cached in --out-dir, "
            "rerun (with fewer --workers if memory is short)"
        ) from error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def other_runnable_now() -> int | None:
    """Tasks runnable at this moment besides this process's own threads (``/proc/loadavg`` less the
    running threads in ``/proc/self/task``: numpy's threads spin for a while after an import), None
    where unknown."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = sum((task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
                  for task in Path("/proc/self/task").iterdir())
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def idle_cores() -> int:
    """The cores this process may use (taskset, cpusets) less the busy ones, at least 1: on a
    machine busy with other jobs more lanes only compete with them. Busy: the 1-minute load
    average, or the tasks runnable right now where fewer (a job that just ended still weighs on
    the average for a minute or two)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    now = other_runnable_now()
    if now is not None:
        busy = min(busy, now)
    return max(1, round(cores - busy))


def score_clips(
    clips: list[Clip],
    protocol: str,
    workers: int = 1,
    cache_dir: Path | None = None,
    description: str = "eval",
    warned: set[str] | None = None,
) -> list[ClipScores]:
    """Score the protocol's frames of every clip, reusing cached clips; returns clips in input order.

    workers: parallel lanes at most, one per FRAMES_PER_PROCESS frames to score: up to
    MAIN_PROCESS_THREADS threads of this process, then spawned processes.

    Clips left without frames (video clips of at most two frames) are skipped with a warning; input
    oddities (16-bit images holding 8-bit values, ground truth without a value above 128) are warned
    about once (see :func:`warn_about_inputs`; ``warned`` carries what was already said over calls).
    Raises WorkerDiedError when a worker process dies.
    """
    cache = ClipCache(cache_dir)
    scored = [frames_to_score(clip, protocol) for clip in clips]
    for clip in scored:
        if not clip.gt_frames:
            warn(f"clip {clip.name} has no frame to score, skipped")
    scored = [clip for clip in scored if clip.gt_frames]
    keys = {clip.name: clip_cache_key(clip, protocol) for clip in scored} if cache_dir else {}
    done = {}
    for clip in scored:
        cached = cache.load(clip.name, keys.get(clip.name))
        if cached is not None and cached.n_frames == len(clip.gt_frames):
            done[clip.name] = cached
    todo = [clip for clip in scored if clip.name not in done]

    parts: dict[str, dict[int, ClipScores]] = {clip.name: {} for clip in todo}
    sizes = {clip.name: len(clip.gt_frames) for clip in todo}
    processes = max(1, min(workers, math.ceil(sum(sizes.values()) / FRAMES_PER_PROCESS)))
    from tqdm import tqdm  # imported here: spawned workers need only the scoring code

    # disable=None: a bar on a terminal, none in logs or pipes
    bar = tqdm(total=sum(sizes.values()), desc=description, unit="frame", file=sys.stderr, leave=False, disable=None)
    with bar:
        for start, part in _run_tasks(_make_tasks(todo), processes):
            name = part.name
            parts[name][start] = part
            bar.update(part.n_frames)
            if sum(p.n_frames for p in parts[name].values()) == sizes[name]:
                ordered = [parts[name][k] for k in sorted(parts[name])]
                fields = ("scalars", "curves", "gt_max", "flags")
                done[name] = ClipScores(name, *(np.concatenate([getattr(p, f) for p in ordered]) for f in fields))
                cache.save(done[name], keys.get(name))
                del parts[name]
    results = [done[clip.name] for clip in scored]
    warn_about_inputs(scored, results, warned)
    return results


def warn_about_inputs(clips: list[Clip], clip_scores: list[ClipScores], warned: set[str] | None = None) -> None:
    """One warning line per kind of input oddity found while scoring (clips: the scored frames).

    * 16-bit images holding 8-bit values (read as 8-bit): once, with a count and the first file;
    * ground truth with nonzero pixels but none above 128 (e.g. masks saved as 0/1), which the toolbox's
      ``gt > 128`` reads as empty: once per clip. The toolbox's numbers are kept.

    warned: messages already printed (e.g. for another method on the same ground truth), skipped; updated.
    """
    warned = set() if warned is None else warned
    messages = []
    for bit, what in ((PRED_16BIT_AS_8BIT, "prediction"), (GT_16BIT_AS_8BIT, "ground-truth")):
        found = []
        for clip, scores in zip(clips, clip_scores):
            files = clip.predictions if bit == PRED_16BIT_AS_8BIT else clip.gt_frames
            found += [files[i] for i in np.flatnonzero(scores.flags & bit)]
        if found:
            messages.append(
                f"{len(found)} {what} image(s) are 16-bit holding 8-bit values (0..255), read as 8-bit "
                f"(first: {found[0]})"
            )
    for clip, scores in zip(clips, clip_scores):
        faint = (scores.gt_max > 0) & (scores.gt_max <= GT_THRESHOLD)
        if faint.any() and not (scores.gt_max > GT_THRESHOLD).any():
            messages.append(
                f"no ground-truth pixel is above {GT_THRESHOLD} in clip {clip.name} (largest value "
                f"{scores.gt_max.max()}): the toolbox binarises gt > {GT_THRESHOLD}, so its masks score as "
                f"empty (masks saved as 0/1? save them as 0/255)"
            )
    for message in messages:
        if message not in warned:
            warn(message)
            warned.add(message)


def unit_scores(clip_scores: list[ClipScores], protocol: str = "video") -> tuple[np.ndarray, np.ndarray]:
    """The units the protocol weighs the same, as rows: scalars (U, n_scalars), curves (U, n_curves, 256).

    video: one row per clip (the clip's means); image: one row per frame of every clip.
    """
    if not clip_scores:
        raise EvalInputError("no frame to score: every clip was empty or too short")
    if protocol == "image":
        return np.concatenate([c.scalars for c in clip_scores]), np.concatenate([c.curves for c in clip_scores])
    means = [c.mean() for c in clip_scores]
    return np.stack([s for s, _ in means]), np.stack([c for _, c in means])


def dataset_means(clip_scores: list[ClipScores], protocol: str = "video") -> tuple[np.ndarray, np.ndarray]:
    """Dataset averages (scalars (n_scalars,), curves (n_curves, 256)): the mean of the protocol's units
    (``unit_scores``). video: every clip weighs the same (mean of the clip means); image: every frame weighs the
    same (mean over all frames of all clips).
    """
    scalars, curves = unit_scores(clip_scores, protocol)
    return scalars.mean(axis=0), curves.mean(axis=0)


def summarize(clip_scores: list[ClipScores], protocol: str = "video") -> dict[str, float]:
    """Dataset summary (weighting: see dataset_means); keys: see eval.metrics.SUMMARY_KEYS."""
    return summarize_curves(*dataset_means(clip_scores, protocol))


def dataset_curves(clip_scores: list[ClipScores], protocol: str = "video") -> np.ndarray:
    """Dataset average curves (weighting: see dataset_means), float64 (n_curves, 256)."""
    return dataset_means(clip_scores, protocol)[1]


def bootstrap_summaries(
    clip_scores: list[ClipScores], protocol: str = "video", resamples: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every summary key of ``resamples`` bootstrap draws of the data: {key: (resamples,) values}.

    What is drawn with replacement are the protocol's units (``unit_scores``): video, whole clips, every drawn clip
    weighing the same (frames of one clip are near-duplicates, so drawing frames would understate the spread);
    image, single frames, as the image benchmarks treat every still as independent (for clips scored with the
    image protocol that understates the spread). The draws depend only on ``seed`` and the number of units, so
    methods scored on the same data get the same draws: their differences are paired.
    """
    unit_scalars, unit_curves = unit_scores(clip_scores, protocol)
    rng = np.random.default_rng(seed)
    units = len(unit_scalars)
    # draw counts per unit, resamples x units: each resample's mean is one matrix product
    counts = np.stack([np.bincount(rng.integers(0, units, units), minlength=units)
                       for _ in range(resamples)]).astype(np.float64) / units
    scalars = counts @ unit_scalars
    curves = (counts @ unit_curves.reshape(units, -1)).reshape(resamples, *unit_curves.shape[1:])
    summaries = [summarize_curves(scalars[i], curves[i]) for i in range(resamples)]
    return {key: np.array([s[key] for s in summaries]) for key in summaries[0]}


def percentile_intervals(draws: dict[str, np.ndarray], level: float = 0.95) -> dict[str, tuple[float, float]]:
    """{key: (low, high)}: the central ``level`` of each key's bootstrap draws."""
    tail = (1 - level) / 2 * 100
    return {key: tuple(float(v) for v in np.percentile(values, [tail, 100 - tail])) for key, values in draws.items()}


def bootstrap_intervals(
    clip_scores: list[ClipScores], protocol: str = "video", resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every summary key, {key: (low, high)} at ``level``
    (``bootstrap_summaries``). With one unit every draw is the data itself and the interval is the estimate."""
    return percentile_intervals(bootstrap_summaries(clip_scores, protocol, resamples, seed), level)


def per_clip_table(clip_scores: list[ClipScores]):
    """One row per clip (pandas DataFrame, index: clip name) with n_frames and the clip's summary keys."""
    import pandas as pd  # imported here: spawned workers need only the scoring code

    rows = {c.name: {"n_frames": c.n_frames, **summarize_curves(*c.mean())} for c in clip_scores}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("clip")


__all__ = [
    "CURVE_NAMES",
    "SCALAR_NAMES",
    "ClipScores",
    "PROTOCOLS",
    "WorkerDiedError",
    "bootstrap_intervals",
    "bootstrap_summaries",
    "check_frame_order",
    "clip_cache_key",
    "dataset_curves",
    "dataset_means",
    "frames_to_score",
    "idle_cores",
    "per_clip_table",
    "percentile_intervals",
    "score_clips",
    "summarize",
    "unit_scores",
]
