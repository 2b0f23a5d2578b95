"""Weight-space interpolation of a fine-tuned g with the g it started from (WiSE-FT, Wortsman et al., 2022).

A fine-tuning run (``model.init_from``) moves g towards what it was tuned for (e.g. more polyp-free crops)
and may lose some of what the starting model did well. Mixing the two sets of weights,
``(1 - alpha) * start + alpha * tuned``, often keeps both. This scores each alpha on the tuned run's own
validation split (the trainer's per-source validation Dice at 0.5, with the SAM embedding cache) and writes
the best one as a checkpoint holding g only; stage 2 (h) is then trained for it::

    python scripts/interpolate_weights.py --run ~/vps-runs/finetune --alphas 0 0.25 0.5 0.75 1 \\
        --out ~/vps-runs/wise/model.pt
    scripts/train_image.sh configs/train/polyp_litemedsam.yaml --stage h --out ~/vps-runs/wise \\
        model.init_from=~/vps-runs/wise/model.pt ...

``--run`` is the fine-tuning run folder: its ``config.yaml`` names the starting checkpoint
(``model.init_from``) and its ``model.pt`` holds the tuned g. alpha 0 is the starting g, 1 the tuned one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

import pandas as pd
import torch
from torch.utils.data import DataLoader

import vps  # noqa: F401
from vps.config import load_config
from vps.modeling import build_prompt_generator, build_sam, save_checkpoint
from vps.modeling.build import initial_weights, load_weights, read_checkpoint
from vps.train.trainer import cached_datasets, dataset_image_size, evaluate, seed_everything, setup_runtime, split_samples


def interpolate(start: Dict[str, torch.Tensor], tuned: Dict[str, torch.Tensor], alpha: float
                ) -> Dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * tuned`` for floating-point tensors; integer ones (counters) from ``tuned``."""
    if start.keys() != tuned.keys():
        raise ValueError("the two checkpoints hold different g architectures")
    return {k: torch.lerp(start[k].float(), v.float(), alpha) if v.is_floating_point() else v
            for k, v in tuned.items()}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the fine-tuning run folder (config.yaml, model.pt)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (the best alpha's g)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        if any(not 0.0 <= a <= 1.0 for a in args.alphas):
            raise ValueError("--alphas must lie in [0, 1]")
        if args.out.exists():
            raise ValueError(f"{args.out} exists; choose another --out (it is never overwritten)")
        config = load_config(args.run / "config.yaml")
        model_config = config["model"]
        if not model_config.get("init_from"):
            raise ValueError(f"{args.run / 'config.yaml'} has no model.init_from: not a fine-tuning run")
        sam_config = dict(model_config["sam"])
        backend, sam_checkpoint = sam_config.pop("backend"), sam_config.pop("checkpoint", None)
        start = initial_weights(model_config["init_from"], backend, model_config["prompt_generator"])
        tuned = read_checkpoint(args.run / "model.pt")
    except (ValueError, OSError) as error:
        print(f"interpolate_weights: error: {error}", file=sys.stderr)
        return 2

    runtime = setup_runtime(config.get("runtime", {}))
    seed_everything(int(config.get("runtime", {}).get("seed", 0)))  # as the trainer: a random test SAM is the same
    _, val_samples, _ = split_samples(config)
    sam = build_sam(backend, sam_checkpoint, **sam_config).to(runtime.device)
    _, val_set = cached_datasets(config, [], val_samples, sam, backend, sam_checkpoint, None, None, runtime,
                                 dataset_image_size(sam, tuned["meta"]["prompt_generator"].get("input_size")))
    loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False)
    generator = build_prompt_generator(tuned["meta"]["prompt_generator"], pretrained_backbone=False).to(runtime.device)

    def forward_g(g, batch):
        embeddings = batch["embedding"] if "embedding" in batch else sam.encode(batch["image"].to(runtime.device))
        return sam.decode(embeddings.to(runtime.device, torch.float32), g(batch["image"].to(runtime.device)))

    rows = []
    for alpha in args.alphas:
        started = time.perf_counter()
        load_weights(generator, interpolate(start["prompt_generator"], tuned["prompt_generator"], alpha),
                     "prompt generator", f"alpha {alpha}")
        _, score, by_source = evaluate(generator, forward_g, loader, runtime)
        rows.append({"alpha": alpha, "score": score, **by_source, "seconds": time.perf_counter() - started})
        print(f"alpha {alpha:.2f}: validation score {score:.4f} "
              + ", ".join(f"{k} {v:.4f}" for k, v in by_source.items()), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.4f"))
    best = table.loc[table["score"].idxmax()]
    meta = {**tuned["meta"], "interpolated": {"start": str(model_config["init_from"]),
                                              "tuned": str(args.run / "model.pt"), "alpha": float(best["alpha"]),
                                              "validation": rows}}
    load_weights(generator, interpolate(start["prompt_generator"], tuned["prompt_generator"], float(best["alpha"])),
                 "prompt generator", "best alpha")
    meta["surrogate"] = None  # h was trained for the tuned g: train it again for this one
    save_checkpoint(args.out, meta, generator)
    print(f"best alpha {best['alpha']:.2f} (validation score {best['score']:.4f}): {args.out}; "
          "train h for it with --stage h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
