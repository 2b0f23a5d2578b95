"""Evaluation protocols: which frames count and how frame scores are averaged.

* video (SUN-SEG / VPS toolbox): frames in playing order, the first and the last frame of every
  clip dropped, scores averaged over a clip's frames, then every clip weighs the same;
* image (Kvasir, CVC-ClinicDB, ...): all images form one group, nothing dropped.

A dataset's curves are the average of its clips' curves; ``max*`` / ``mean*`` are taken on that
averaged curve (see :func:`eval.metrics.summarize_curves`).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.metrics import CURVE_NAMES, SCALAR_NAMES, FrameScores, score_frame, summarize_curves
from eval.readers import Clip, EvalInputError, read_grey

PROTOCOLS = ("video", "image")
CACHE_VERSION = "1"
FRAMES_PER_TASK = 8


@dataclass
class ClipScores:
    """Per-frame scores of one clip: scalars float64 (F, n_scalars), curves float64 (F, n_curves, 256)."""

    name: str
    scalars: np.ndarray
    curves: np.ndarray

    @property
    def n_frames(self) -> int:
        return len(self.scalars)

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        """Clip averages: scalars (n_scalars,), curves (n_curves, 256)."""
        return self.scalars.mean(axis=0), self.curves.mean(axis=0)


def frames_to_score(clip: Clip, protocol: str) -> Clip:
    """The clip restricted to the frames the protocol scores (video: without first and last)."""
    if protocol == "video":
        return Clip(clip.name, clip.gt_frames[1:-1], clip.predictions[1:-1])
    return clip


def score_file_pair(gt_path: Path, pred_path: Path | None) -> FrameScores:
    """Scores of one frame read from disk; a missing prediction (None) counts as an empty one."""
    gt = read_grey(gt_path)
    pred = read_grey(pred_path) if pred_path is not None else np.zeros_like(gt)
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

    def load(self, clip_name: str, key: str) -> ClipScores | None:
        if self.folder is None or not self._path(clip_name).is_file():
            return None
        try:
            with np.load(self._path(clip_name)) as data:
                if str(data["key"]) != key:
                    return None
                return ClipScores(clip_name, data["scalars"], data["curves"])
        except (OSError, ValueError, KeyError):  # a half-written file from an interrupted run
            return None

    def save(self, scores: ClipScores, key: str) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{scores.name}.tmp.npz"
        np.savez(tmp, key=key, scalars=scores.scalars, curves=scores.curves)
        os.replace(tmp, self._path(scores.name))  # atomic: an interruption never leaves a torn file


def _score_task(task):
    """Worker: (clip name, first frame index, [(gt, pred), ...]) -> (clip name, index, scalars, curves)."""
    clip_name, start, pairs = task
    scores = [score_file_pair(gt, pred) for gt, pred in pairs]
    return clip_name, start, np.stack([s.scalars for s in scores]), np.stack([s.curves for s in scores])


def _init_worker():
    import cv2

    cv2.setNumThreads(1)  # processes already use every core


def _make_tasks(clips: list[Clip]):
    for clip in clips:
        pairs = list(zip(clip.gt_frames, clip.predictions))
        for start in range(0, len(pairs), FRAMES_PER_TASK):
            yield clip.name, start, pairs[start : start + FRAMES_PER_TASK]


def _run_tasks(tasks, workers: int):
    if workers <= 1:
        yield from map(_score_task, tasks)
        return
    # spawn, not fork: a fork after OpenCV's thread pool has run can deadlock the children
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_score_task, tasks)


def score_clips(
    clips: list[Clip],
    protocol: str,
    workers: int = 1,
    cache_dir: Path | None = None,
    description: str = "eval",
) -> list[ClipScores]:
    """Score the protocol's frames of every clip, reusing cached clips; returns clips in input order.

    Clips left without frames (video clips of at most two frames) are skipped with a warning.
    """
    cache = ClipCache(cache_dir)
    scored = [frames_to_score(clip, protocol) for clip in clips]
    for clip in scored:
        if not clip.gt_frames:
            print(f"vps-eval: warning: clip {clip.name} has no frame to score, skipped", file=sys.stderr)
    scored = [clip for clip in scored if clip.gt_frames]
    keys = {clip.name: clip_cache_key(clip, protocol) for clip in scored}
    done = {}
    for clip in scored:
        cached = cache.load(clip.name, keys[clip.name])
        if cached is not None and cached.n_frames == len(clip.gt_frames):
            done[clip.name] = cached
    todo = [clip for clip in scored if clip.name not in done]

    parts: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {clip.name: {} for clip in todo}
    sizes = {clip.name: len(clip.gt_frames) for clip in todo}
    # disable=None: a bar on a terminal, none in logs or pipes
    bar = tqdm(total=sum(sizes.values()), desc=description, unit="frame", file=sys.stderr, leave=False, disable=None)
    with bar:
        for name, start, scalars, curves in _run_tasks(_make_tasks(todo), workers):
            parts[name][start] = (scalars, curves)
            bar.update(len(scalars))
            if sum(len(s) for s, _ in parts[name].values()) == sizes[name]:
                ordered = [parts[name][k] for k in sorted(parts[name])]
                done[name] = ClipScores(
                    name, np.concatenate([s for s, _ in ordered]), np.concatenate([c for _, c in ordered])
                )
                cache.save(done[name], keys[name])
                del parts[name]
    return [done[clip.name] for clip in scored]


def summarize(clip_scores: list[ClipScores]) -> dict[str, float]:
    """Dataset summary, every clip weighing the same; keys: see eval.metrics.SUMMARY_KEYS."""
    if not clip_scores:
        raise EvalInputError("no frame to score: every clip was empty or too short")
    means = [c.mean() for c in clip_scores]
    scalars = np.mean([s for s, _ in means], axis=0)
    curves = np.mean([c for _, c in means], axis=0)
    return summarize_curves(scalars, curves)


def dataset_curves(clip_scores: list[ClipScores]) -> np.ndarray:
    """Clip-weighted average curves, float64 (n_curves, 256)."""
    return np.mean([c.mean()[1] for c in clip_scores], axis=0)


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
    "clip_cache_key",
    "dataset_curves",
    "frames_to_score",
    "per_clip_table",
    "score_clips",
    "summarize",
]
