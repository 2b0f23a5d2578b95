"""vps-train: train AutoSAM's prompt generator g, then the surrogate decoder h, from a YAML config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

DEFAULT_CONFIG = "configs/train/polyp_litemedsam.yaml"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vps-train",
        description="Train AutoSAM on image/mask pairs. Every run writes its resolved config, per-epoch "
                    "checkpoints, a CSV log and a PNG plot into --out.",
        epilog="Overrides: dotted.key=value, e.g. train_g.epochs=20 data.root=/data/TrainDataset cache.enabled=false. "
               "Under torchrun every rank trains with DistributedDataParallel.",
    )
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings that replace the config's")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    parser.add_argument("--stage", choices=["g", "h", "all"], default="all",
                        help="g: prompt generator with frozen SAM; h: surrogate decoder on the trained g; all: both")
    parser.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --out")
    args = parser.parse_args(argv)
    if "=" in args.config:  # only overrides were given: keep the default config
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import vps  # noqa: F401  (torchvision compatibility before timm loads)
    from vps.config import ConfigError, apply_overrides, load_config
    from vps.modeling.build_sam import CheckpointError
    from vps.train.data import DataError
    from vps.train.trainer import train

    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        out = Path(args.out or Path("runs") / Path(args.config).stem)
        if not args.resume and (out / "g_last.pt").exists() and args.stage in ("g", "all"):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        stages = ("g", "h") if args.stage == "all" else (args.stage,)
        model_path = train(config, out, stages=stages, resume=args.resume)
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        print(f"vps-train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vps-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(f"trained model: {model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
