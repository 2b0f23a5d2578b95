"""Export a training run's model.pt as a small float16 checkpoint (the built-in model is made this way).

    python scripts/export_model.py runs/default vps/weights/autosam_litemedsam_polyp.pt
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import vps  # noqa: F401
from vps.modeling import (build_embedding_prompt, build_prompt_generator, build_surrogate, read_checkpoint,
                          save_checkpoint)
from vps.modeling.build import without_embedding_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training output folder (holds model.pt and log_*.csv)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--box-refinement", action=argparse.BooleanOptionalAction, default=None,
                        help="AutoSAM's box refinement at inference (default: the run's setting, model.box_refinement)")
    parser.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                        help="AutoSAM's mirrored prompt at inference (default: the run's setting, model.flip_tta)")
    parser.add_argument("--embedding-prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the run's embedding prompt head (default: when the run has one; --no-embedding-"
                             "prompt exports g and h alone)")
    args = parser.parse_args()
    payload = read_checkpoint(args.run / "model.pt")
    meta = dict(payload["meta"])
    if args.box_refinement is not None:
        meta["box_refinement"] = args.box_refinement
    if args.flip_tta is not None:
        meta["flip_tta"] = args.flip_tta
    for stage in ("g", "embedding_prompt", "h"):
        log = args.run / f"log_{stage}.csv"
        if log.is_file():
            rows = list(csv.DictReader(log.open()))
            best = max(rows, key=lambda r: float(r["val_dice"]))  # epoch 0: the starting model of a fine-tuning
            meta[f"stage_{stage}"] = {"epochs": sum(int(r["epoch"]) > 0 for r in rows), "best_epoch": int(best["epoch"]),
                                      "best_val_dice": float(best["val_dice"])}
    generator = build_prompt_generator(meta["prompt_generator"], pretrained_backbone=False)
    generator.load_state_dict(payload["prompt_generator"])
    surrogate = None
    if "surrogate" in payload:
        surrogate = build_surrogate(meta.get("surrogate"))
        surrogate.load_state_dict(payload["surrogate"])
    embedding_prompt = None
    if args.embedding_prompt and "embedding_prompt" not in payload:
        raise SystemExit(f"export_model: {args.run / 'model.pt'} holds no embedding prompt head")
    if "embedding_prompt" in payload and args.embedding_prompt is not False:
        embedding_prompt = build_embedding_prompt(meta["embedding_prompt"])
        embedding_prompt.load_state_dict(payload["embedding_prompt"])
    elif "embedding_prompt" in meta:
        meta = without_embedding_prompt(meta)
    path = save_checkpoint(args.out, meta, generator, surrogate, half=True, embedding_prompt=embedding_prompt)
    stages = ", ".join(f"{key}: {value}" for key, value in meta.items() if key.startswith("stage_"))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, float16): {stages}")


if __name__ == "__main__":
    main()
