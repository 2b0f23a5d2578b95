"""Validation report for a trained model: every number of MODEL_CARD.md, from one command.

For each validation source recorded in the checkpoint (the CVC-ClinicDB validation clips, the Kvasir
validation stills, ...) it writes 8-bit probability maps of three methods -- AutoSAM (g + frozen SAM,
no prompt), the light model h(g(I)) and the frozen SAM prompted with the ground-truth box (a reference
that needs the answer) -- and scores them with ``vps-eval``: the video protocol for clips, the image
protocol for stills. ``--prompt-baselines`` adds the AutoSAM paper's other SAM references: SAM prompted
with a box or an interior point per connected component of the ground truth, with the ground-truth mask as
its mask prompt, and with AutoSAM's output as its mask prompt (vps/modeling/prompts.py). On the polyp-free
crops of the validation images it reports the share of crops on which a method outputs any pixel above 0.5.
Every headline number comes with a 95 % interval: a bootstrap over the clips (video protocol) or the stills
(image protocol) from ``vps-eval --bootstrap``, and a Wilson interval for the polyp-free share.

    python scripts/validate_model.py --checkpoint vps/weights/autosam_litemedsam_polyp.pt \\
        --data ../shared/data/cvc-clinicdb-video ../shared/data/kvasir-seg --out runs/validation

``--cache-dir`` reuses the training run's SAM embeddings (computed once per image, as in training);
without it every image is encoded here. ``--split-from`` takes the validation split from another
checkpoint (to score an older model on the same images). ``--eval-only`` scores the maps an earlier run
left in ``--out`` again, without running the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd
import torch
from scipy.stats import binomtest
from tqdm import tqdm

import vps  # noqa: F401
from vps.modeling import AutoSAM, load_model_from_checkpoint, read_checkpoint
from vps.train.cache import EmbeddingCache
from vps.train.data import Sample, read_pair
from vps.train.negatives import NEGATIVE_SOURCE
from vps.validation import (ModelMethod, PromptMethod, ValidationError, WindowEmbeddings, method_maps, relative_path,
                            run_vps_eval, save_png, sources_are_stills, validation_samples)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "cvc-clinicdb-video", SHARED / "kvasir-seg"]
METHODS = ["AutoSAM", "Light-h(g(I))", "LiteMedSAM-GT-box"]
# AutoSAM's inference options (MODEL_CARD.md): a checkpoint that turns them on is also scored without each, and
# without all of them ("AutoSAM-plain": g and SAM as trained)
INFERENCE_OPTIONS = {"box_refinement": "AutoSAM-no-box-refinement", "flip_tta": "AutoSAM-no-flip-tta",
                     "embedding_prompt": "AutoSAM-no-embedding-prompt"}
PLAIN = "AutoSAM-plain"
# --prompt-baselines: the AutoSAM paper's other SAM references (vps/modeling/prompts.py), method -> baseline
PROMPT_BASELINES = {"LiteMedSAM-GT-boxes": "gt_boxes", "LiteMedSAM-GT-points": "gt_points",
                    "LiteMedSAM-GT-mask": "gt_mask", "LiteMedSAM-AutoSAM-mask": "autosam_mask"}


def inference_options(autosam: AutoSAM) -> Dict[str, bool]:
    """A loaded AutoSAM's inference options, on or off."""
    return {option: getattr(autosam, option) is not None if option == "embedding_prompt" else getattr(autosam, option)
            for option in INFERENCE_OPTIONS}


def variant(autosam: AutoSAM, options: Dict[str, bool]) -> AutoSAM:
    """``autosam`` (same SAM, g and embedding prompt head) with its inference options set to ``options``."""
    mixed = options["embedding_prompt"] and autosam.embedding_prompt is not None
    return AutoSAM(autosam.sam, autosam.prompt_generator, box_refinement=options["box_refinement"],
                   flip_tta=options["flip_tta"], embedding_prompt=autosam.embedding_prompt if mixed else None,
                   embedding_prompt_weight=autosam.embedding_prompt_weight if mixed else 0.0)


def ablations(settings: Dict) -> Dict[str, Dict[str, bool]]:
    """The AutoSAM variants scored beside a model whose inference options are ``settings`` (a checkpoint header,
    or :func:`inference_options`): each option that is on turned off alone, then all off; name -> AutoSAM's options.
    Without the embedding prompt, a checkpoint's model is the one it was built on (stage embedding_prompt)."""
    on = {option: bool(settings.get(option)) for option in INFERENCE_OPTIONS}
    variants = {name: {**on, option: False} for option, name in INFERENCE_OPTIONS.items() if on[option]}
    if sum(on.values()) > 1:
        variants[PLAIN] = {option: False for option in INFERENCE_OPTIONS}
    return variants


def write_maps(args: argparse.Namespace, positives: List[Sample], crops: List[Sample], methods: List[str]) -> None:
    """Probability maps of ``methods`` for the validation images (``<out>/<method>/<source>/...``), the
    ground truth beside them, and the share of polyp-free crops with output (``<out>/polyp_free.json``)."""
    autosam = load_model_from_checkpoint(args.checkpoint, "autosam")
    light = load_model_from_checkpoint(args.checkpoint, "light")
    sam = autosam.sam
    embed = WindowEmbeddings(sam, EmbeddingCache(args.cache_dir.expanduser(), sam.backend) if args.cache_dir else None)
    models = [ModelMethod("AutoSAM", autosam), ModelMethod("Light-h(g(I))", light)]
    for name, options in ablations(inference_options(autosam)).items():
        models.append(ModelMethod(name, variant(autosam, options)))
    prompted = [PromptMethod(method, sam, baseline, models[0])
                for method, baseline in {"LiteMedSAM-GT-box": "gt_box", **PROMPT_BASELINES}.items() if method in methods]
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext())
    stills = sources_are_stills(positives)
    flagged = {method.name: [] for method in models}
    started = time.perf_counter()
    with torch.inference_mode(), autocast:
        for sample in tqdm(positives + crops, desc="validation images", unit="img"):
            image, mask = read_pair(sample)
            if sample.source == NEGATIVE_SOURCE:
                for method, array in method_maps(image, mask, models, embed).items():
                    flagged[method].append(bool((array > 127).any()))  # some pixel with probability > 0.5
                continue
            name = relative_path(sample, stills[sample.source])
            for method, array in method_maps(image, mask, models + prompted, embed).items():
                save_png(array, args.out / method / name)
            save_png(mask.astype(np.uint8) * 255, args.out / "gt" / name)
    print(f"{len(positives)} validation images and {len(crops)} polyp-free crops in {time.perf_counter() - started:.0f} s"
          f" ({embed.reused} SAM embeddings from the cache, the rest encoded here)")
    free = {m: float(np.mean(v)) if v else float("nan") for m, v in flagged.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "polyp_free.json").write_text(json.dumps({"crops": len(crops), **free}, indent=2) + "\n")


def wilson_interval(flagged: int, total: int) -> tuple:
    """95 % Wilson score interval of a share of ``flagged`` in ``total``."""
    interval = binomtest(flagged, total).proportion_ci(confidence_level=0.95, method="wilson")
    return interval.low, interval.high


def headline_cells(table: pd.DataFrame, number: str) -> pd.DataFrame:
    """methods x (source, metric) cells 'estimate (low to high)' of the card's headline metrics."""
    rows = table[table["metric"].isin(["maxDice", "meanDice", "meanIoU"])]
    cells = [f"{number.format(r.estimate)} ({number.format(r.low)} to {number.format(r.high)})"
             for r in rows.itertuples()]
    return rows.assign(cell=cells).pivot(index="method", columns=["source", "metric"], values="cell")


def report(args: argparse.Namespace, positives: List[Sample], methods: List[str]) -> None:
    """Scores the maps in ``args.out`` with vps-eval and prints every table of the model card."""
    rows, interval_parts, difference_parts = [], [], []
    for source, stills in sorted(sources_are_stills(positives).items()):
        protocol = "image" if stills else "video"
        summaries = run_vps_eval(args.out / "gt" / source, [args.out / m / source for m in methods], protocol,
                                 args.out / "eval" / source, bootstrap=args.bootstrap)
        for method_root, summary in zip(methods, summaries.values()):
            rows.append({"source": source, "protocol": protocol, "method": method_root, **summary})
        if args.bootstrap:
            names = dict(zip(summaries, methods))  # vps-eval's folder names -> methods
            for name, parts in (("intervals.csv", interval_parts), ("differences.csv", difference_parts)):
                part = pd.read_csv(args.out / "eval" / source / name)
                parts.append(part.assign(source=source, method=part["method"].map(names)))
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "validation_summary.csv", index=False)
    paper = table.pivot(index="method", columns="source", values=["meanDice", "meanIoU"]).loc[methods]
    free = json.loads((args.out / "polyp_free.json").read_text())
    crops = free.pop("crops")
    columns = ["Smeasure", "meanEm", "wFmeasure", "meanFm", "maxDice", "meanDice", "meanIoU", "meanSen", "Dice@0.5"]
    pd.set_option("display.width", 200)
    for source, part in table.groupby("source"):
        print(f"\n{source} ({part['protocol'].iloc[0]} protocol, vps-eval):")
        print(part.set_index("method")[columns].to_string(float_format=lambda v: f"{v:.3f}"))
    print("\nThe AutoSAM paper's format (meanDice / meanIoU per set):")
    print(paper.to_string(float_format=lambda v: f"{v:.3f}"))
    if interval_parts:
        columns = ["source", "method", "metric", "estimate", "low", "high"]
        intervals, differences = pd.concat(interval_parts)[columns], pd.concat(difference_parts)[columns]
        intervals.to_csv(args.out / "validation_intervals.csv", index=False)
        differences.to_csv(args.out / "validation_differences.csv", index=False)
        print(f"\n95 % intervals (bootstrap, {args.bootstrap} resamples of the clips or stills of each set):")
        print(headline_cells(intervals, "{:.3f}").loc[methods].to_string())
        print(f"\nMinus {methods[0]}, paired (the same draws for every method), 95 % intervals:")
        print(headline_cells(differences, "{:+.3f}").loc[methods[1:]].to_string())
    print(f"\nPolyp-free crops (any pixel above 0.5), share of {crops} (95 % Wilson interval):")
    shares = pd.DataFrame({"share": free})
    if crops:
        bounds = [wilson_interval(round(share * crops), crops) for share in shares["share"]]
        shares["low"], shares["high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    print(shares.to_string(float_format=lambda v: f"{v:.3f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, help="the training run's data roots")
    parser.add_argument("--out", type=Path, default=Path("runs/validation"))
    parser.add_argument("--cache-dir", type=Path, help="the training run's embedding cache (cache.dir)")
    parser.add_argument("--split-from", type=Path, help="take the validation split from this checkpoint")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="g, SAM's decoder and h")
    parser.add_argument("--prompt-baselines", action="store_true",
                        help="also SAM prompted with a box or an interior point per connected component of the "
                             "ground truth, the ground-truth mask, and AutoSAM's output as the mask prompt")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="resamples for the 95 %% intervals (vps-eval --bootstrap; default 1000, 0: none)")
    parser.add_argument("--eval-only", action="store_true",
                        help="score the maps an earlier run of this command left in --out (no model run)")
    args = parser.parse_args()
    checkpoint_meta = read_checkpoint(args.checkpoint)["meta"]
    meta = read_checkpoint(args.split_from)["meta"] if args.split_from else checkpoint_meta
    methods = METHODS + list(ablations(checkpoint_meta)) + (list(PROMPT_BASELINES) if args.prompt_baselines else [])
    if args.eval_only and not (args.out / "polyp_free.json").is_file():
        raise SystemExit(f"validate_model: --eval-only needs the maps of an earlier run in {args.out}")
    positives, crops = validation_samples(meta, args.data, with_crops=not args.eval_only)
    if not args.eval_only:
        write_maps(args, positives, crops, methods)
    report(args, positives, methods)


if __name__ == "__main__":
    try:
        main()
    except ValidationError as error:  # no validation clips in the checkpoint, vps-eval failed: one line
        raise SystemExit(f"validate_model: {error}") from None
