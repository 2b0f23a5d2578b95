"""``vps-eval``: SUN-SEG video metrics and image benchmarks.

Examples::

    vps-eval --split easy --subset unseen --data-root SUN-SEG --pred-root preds/
    vps-eval --gt-root data/cvc-clinicdb-video --pred-root preds/ --out-dir results/
    vps-eval --gt-root Kvasir/masks --protocol image --methods runs/a runs/b --all
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from eval.metrics import PAPER_COLUMNS, SUMMARY_KEYS
from eval.protocol import (
    FRAMES_PER_PROCESS,
    MAIN_PROCESS_THREADS,
    PROTOCOLS,
    ClipScores,
    WorkerDiedError,
    bootstrap_summaries,
    dataset_curves,
    idle_cores,
    per_clip_table,
    percentile_intervals,
    score_clips,
    summarize,
)
from eval.readers import (
    SUN_SEG_SPLITS,
    SUN_SEG_SUBSETS,
    EvalInputError,
    find_gt_clips,
    kvasir_masks_root,
    match_predictions,
    sun_seg_gt_root,
    warn,
)

PROG = "vps-eval"
PLOTTED_CURVES = (("Fm", "F-beta"), ("Em", "E-phi"), ("Dice", "Dice"))


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one ``vps-eval: error: ...`` line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description="Evaluate segmentation predictions with the SUN-SEG protocol.")
    data = parser.add_argument_group("data (SUN-SEG: --split/--data-root; any data: --gt-root)")
    data.add_argument("--split", choices=sorted(SUN_SEG_SPLITS), help="SUN-SEG test split")
    data.add_argument("--subset", choices=sorted(SUN_SEG_SUBSETS), default="unseen", help="SUN-SEG subset")
    data.add_argument("--data-root", type=Path, help="SUN-SEG root holding TestEasyDataset/ TestHardDataset/")
    data.add_argument("--gt-root", type=Path, help="ground truth: <root>/<clip>/[masks/]*.png or <root>/*.png")
    data.add_argument("--protocol", choices=PROTOCOLS, help="video (default) or image; SUN-SEG is always video")
    preds = parser.add_mutually_exclusive_group(required=True)
    preds.add_argument("--pred-root", type=Path, help="predictions: <pred-root>/<clip>/<frame>.png")
    preds.add_argument("--methods", type=Path, nargs="+", help="several prediction roots, one table row each")
    parser.add_argument("--missing", choices=("error", "empty"), default="error",
                        help="missing prediction frames: fail (default) or score them as empty predictions")
    parser.add_argument("--out-dir", type=Path, help="write per_clip.csv, summary.json, curve plots and a cache")
    parser.add_argument("--all", action="store_true", help="print every metric, not only the six paper columns")
    parser.add_argument("--bootstrap", type=positive_int, metavar="N",
                        help="also print 95 %% intervals from N resamples (with replacement) of the clips, or of "
                             "the frames with --protocol image, e.g. 1000, and with --methods the paired "
                             "differences to the first method; with --out-dir also in intervals.csv, differences.csv")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --bootstrap resamples (default 0)")
    parser.add_argument("--workers", type=positive_int,
                        help="parallel lanes at most, at least 1, one per "
                             f"{FRAMES_PER_PROCESS} frames to score: {MAIN_PROCESS_THREADS} threads of this process, "
                             "then spawned processes (default: the idle cores, those this process may use less the "
                             "1-minute load average or, where fewer, the tasks runnable now)")
    return parser


def resolve_gt_root(args) -> tuple[Path, str]:
    """(ground-truth root, protocol) from the arguments; raises EvalInputError on a bad data root."""
    if args.split:
        if args.gt_root or args.protocol == "image":
            raise EvalInputError("--split (SUN-SEG) cannot be combined with --gt-root or --protocol image")
        if args.data_root is None:
            raise EvalInputError("--split needs --data-root (the SUN-SEG folder)")
        return sun_seg_gt_root(args.data_root, args.split, args.subset), "video"
    if args.gt_root is None:
        raise EvalInputError("give --split with --data-root (SUN-SEG) or --gt-root")
    protocol = args.protocol or "video"
    masks = kvasir_masks_root(args.gt_root) if args.gt_root.is_dir() else None
    if masks is not None:
        hint = " (an image benchmark? add --protocol image)" if protocol == "video" else ""
        print(f"{PROG}: note: {args.gt_root} holds images/ and masks/: using {masks} as the ground truth{hint}",
              file=sys.stderr)
        return masks, protocol
    return args.gt_root, protocol


def method_names(pred_roots: list[Path]) -> list[str]:
    """Short unique names for prediction roots: their folder names, made unique with the parent."""
    names = [p.resolve().name or str(p) for p in pred_roots]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}_{p.resolve().name}" for p in pred_roots]
    if len(set(names)) < len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    return names


def evaluate_method(
    gt_root: Path, pred_root: Path, protocol: str, args, name: str, warned: set[str] | None = None
) -> list[ClipScores]:
    """Scores of every clip of one prediction root; raises EvalInputError on missing predictions.

    warned: warnings already printed (for an earlier method), not repeated.
    """
    clips = find_gt_clips(gt_root)
    missing = match_predictions(clips, pred_root)
    if missing and args.missing == "error":
        shown = "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else "")
        raise EvalInputError(
            f"predictions missing in {pred_root}: {shown} (use --missing empty to score them as empty)"
        )
    if missing:
        warn(f"scoring as empty: {'; '.join(missing)}")
    cache_dir = args.out_dir / ".cache" / name if args.out_dir else None
    return score_clips(clips, protocol, workers=args.workers, cache_dir=cache_dir, description=name, warned=warned)


def save_curve_plots(curves_by_method: dict, out_dir: Path) -> list[Path]:
    """One PNG per plotted curve (F-beta, E-phi, Dice against the threshold index), a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.metrics import CURVE_NAMES

    paths = []
    thresholds = np.linspace(1, 0, 256)  # column k: 8-bit threshold 255 - k, or float threshold 1 - k / 255
    for curve, label in PLOTTED_CURVES:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, curves in curves_by_method.items():
            ax.plot(thresholds, curves[CURVE_NAMES.index(curve)], label=method)
        ax.set(xlabel="threshold", ylabel=label, title=f"{label} over thresholds", xlim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        path = out_dir / f"curve_{curve}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def interval_table(estimates: dict, intervals: dict):
    """Rows (method, metric): estimate, low, high of the bootstrap intervals (pandas DataFrame)."""
    import pandas as pd

    rows = [{"method": method, "metric": key, "estimate": estimates[method][key], "low": low, "high": high}
            for method, by_key in intervals.items() for key, (low, high) in by_key.items()]
    return pd.DataFrame(rows).set_index(["method", "metric"])


def format_intervals(estimates: dict, intervals: dict, show_all: bool, title: str, signed: bool = False) -> str:
    """The table's columns as 'estimate (low to high)' cells, 3 decimals (``signed``: with a + for gains)."""
    import pandas as pd

    number = "{:+.3f}" if signed else "{:.3f}"
    keys = list(SUMMARY_KEYS if show_all else PAPER_COLUMNS)
    cells = {method: {key: f"{number.format(estimates[method][key])} ({number.format(by_key[key][0])} to "
                           f"{number.format(by_key[key][1])})" for key in keys}
             for method, by_key in intervals.items()}
    table = pd.DataFrame.from_dict(cells, orient="index")[keys].rename_axis("method")
    return f"{title}\n{table.to_string()}"


def paired_differences(summaries: dict, draws: dict) -> tuple[dict, dict]:
    """(estimates, intervals) of every method but the first minus the first, per key, from the same bootstrap
    draws (paired: each draw holds the same clips or frames for every method)."""
    reference, *others = list(draws)
    estimates = {m: {k: summaries[m][k] - summaries[reference][k] for k in summaries[m]} for m in others}
    intervals = {m: percentile_intervals({k: draws[m][k] - draws[reference][k] for k in draws[m]}) for m in others}
    return estimates, intervals


def write_outputs(out_dir: Path, summaries: dict, per_clip: dict, curves: dict, intervals: dict | None = None,
                  differences: tuple | None = None) -> None:
    """per_clip.csv (method, clip rows), summary.json (flat keys for one method, else method -> keys), plots;
    intervals.csv (method, metric, estimate, low, high) with ``intervals``, differences.csv (the same for each
    method minus the first) with ``differences`` (``paired_differences``)."""
    import pandas as pd  # imported here, as below: spawned workers re-import the main module

    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.concat(per_clip, names=["method"])
    table.to_csv(out_dir / "per_clip.csv")
    summary = next(iter(summaries.values())) if len(summaries) == 1 else summaries
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if intervals:
        interval_table(summaries, intervals).to_csv(out_dir / "intervals.csv")
    if differences and differences[1]:
        interval_table(*differences).to_csv(out_dir / "differences.csv")
    save_curve_plots(curves, out_dir)


def format_table(summaries: dict, show_all: bool) -> str:
    """Rows = methods, columns = the six paper columns (or every key), 3 decimals for display only."""
    import pandas as pd

    table = pd.DataFrame.from_dict(summaries, orient="index")
    table = table[list(SUMMARY_KEYS if show_all else PAPER_COLUMNS)].rename_axis("method")
    return table.to_string(float_format=lambda v: f"{v:.3f}")


def run(args) -> int:
    gt_root, protocol = resolve_gt_root(args)
    args.workers = args.workers or idle_cores()
    pred_roots = args.methods or [args.pred_root]
    names = method_names(pred_roots)
    summaries, per_clip, curves, draws, warned = {}, {}, {}, {}, set()
    for name, pred_root in zip(names, pred_roots):
        clip_scores = evaluate_method(gt_root, pred_root, protocol, args, name, warned)
        summaries[name] = summarize(clip_scores, protocol)
        per_clip[name] = per_clip_table(clip_scores)
        curves[name] = dataset_curves(clip_scores, protocol)
        if args.bootstrap:
            draws[name] = bootstrap_summaries(clip_scores, protocol, args.bootstrap, seed=args.seed)
    print(format_table(summaries, args.all))
    intervals = {name: percentile_intervals(method_draws) for name, method_draws in draws.items()}
    differences = paired_differences(summaries, draws) if len(draws) > 1 else None
    if intervals:
        unit = "frames" if protocol == "image" else "clips"
        print(format_intervals(summaries, intervals, args.all,
                               f"95 % intervals (bootstrap, {args.bootstrap} resamples of the {unit}):"))
    if differences:
        print(format_intervals(*differences, args.all, f"minus {names[0]}, paired (the same draws), 95 % intervals:",
                               signed=True))
    if args.out_dir:
        write_outputs(args.out_dir, summaries, per_clip, curves, intervals, differences)
        print(f"results written to {args.out_dir}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point of ``vps-eval``; returns the exit status (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or an argument error already printed as one line
        return int(exit_request.code or 0)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (finished clips are cached in --out-dir)", file=sys.stderr)
        return 130
    except EvalInputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except WorkerDiedError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. an unwritable --out-dir
        print(f"{PROG}: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
