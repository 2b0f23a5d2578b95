"""vps-train: train AutoSAM's prompt generator g, then the surrogate decoder h, from a YAML config."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PROG = "vps-train"
# The repository's configs/ folder, found from this file (vps/cli/train.py), so that the default works from any
# folder; relative paths inside a config (data.root, cache.dir) and --out stay relative to the caller's folder.
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "train" / "polyp_litemedsam.yaml")


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one ``vps-train: error: ...`` line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = _OneLineParser(
        prog=PROG,
        description="Train AutoSAM on image/mask pairs. Every run writes its resolved config, per-epoch "
                    "checkpoints, a CSV log and a PNG plot into --out.",
        epilog="Overrides: dotted.key=value, e.g. train_g.epochs=20 data.root=/data/TrainDataset cache.enabled=false. "
               "--resume continues the run in --out with its saved config.yaml; there only the stages' epochs "
               "(train_g.epochs, ...), runtime.*, cache.dir and cache.validation may change. "
               "Under torchrun every rank trains with DistributedDataParallel.",
    )
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                        help="YAML config (default: the repository's configs/train/polyp_litemedsam.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings that replace the config's")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config name>, in this folder)")
    parser.add_argument("--stage", choices=["g", "embedding_prompt", "h", "all"], default="all",
                        help="g: prompt generator with frozen SAM; embedding_prompt: the second prompt generator on "
                             "SAM's embedding (configs with model.embedding_prompt); h: surrogate decoder on the "
                             "trained g; all: each in turn (a config with a prompt-free model.head trains it in one "
                             "stage: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last finished epoch, with its saved config.yaml")
    args = parser.parse_intermixed_args(argv)  # overrides may also follow the options
    if "=" in args.config:  # only overrides were given: keep the default config
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    return args


def error_message(error: BaseException) -> str:
    """One line for any error. An exception re-raised by a DataLoader worker carries the worker's whole traceback
    as its message ('Caught DataError in DataLoader worker process 0. Original Traceback ...'): keep its last line,
    the original message, without the 'module.Type: ' prefix."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].strip()
        head, _, rest = text.partition(": ")
        if rest and head.split(".")[-1] == type(error).__name__:
            text = rest
    if isinstance(error, OSError) and getattr(error, "filename", None) and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return text.splitlines()[0] if text else type(error).__name__


def _finished_epochs(out: Path, stage: str) -> int:
    """Epochs stage ``stage`` has finished in ``out`` (0 without a state file)."""
    import torch

    path = out / f"{stage}_last.pt"
    if not path.is_file():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) + 1


def prepare_resume(out: Path, config: Dict[str, Any], stages: Sequence[str], is_main: bool = True) -> None:
    """Checks the epochs against what the run has done and keeps model.pt consistent.

    If stage g gets more epochs after stage h (or the embedding prompt head) has run, that stage was trained on
    (or chosen with) the old g: its state is moved aside (``h_last.stale.pt``, ``log_h.stale.csv``) so it starts
    again from scratch on the new g instead of resuming (a resumed stage would keep its old best score and might
    never write the new g and itself into model.pt again).
    """
    from vps.config import ConfigError

    done = {stage: _finished_epochs(out, stage) for stage in ("g", "embedding_prompt", "h", "head")}
    for stage in stages:
        epochs = config[f"train_{stage}"]["epochs"]
        if done[stage] > epochs:
            raise ConfigError(f"--resume: train_{stage}.epochs={epochs} is below the {done[stage]} epochs stage "
                              f"{stage} has already finished in {out}")
    for later in ("embedding_prompt", "h"):
        if not ("g" in stages and done[later] and config["train_g"]["epochs"] > done["g"]):
            continue
        if is_main:
            for name in (f"{later}_last.pt", f"log_{later}.csv", f"log_{later}.png"):
                if (out / name).is_file():
                    stale = Path(name).stem + ".stale" + Path(name).suffix
                    (out / name).replace(out / stale)
            rerun = ("it is retrained in this run" if later in stages
                     else f"retrain it afterwards with --stage {later} --resume")
            print(f"stage g continues to epoch {config['train_g']['epochs']}: stage {later} was trained on the old "
                  f"g, so its state is moved to {later}_last.stale.pt and {rerun}", flush=True)


def training_samples(config: Dict[str, Any]) -> list:
    """The samples of ``data.root`` (one folder or a list of folders)."""
    from vps.config import class_names
    from vps.train.data import as_root_list, discover_samples

    return [s for root in as_root_list(config["data"]["root"]) for s in discover_samples(root, class_names(config))]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        import vps  # noqa: F401  (torchvision compatibility before timm loads)
        from vps.config import (ConfigError, apply_overrides, load_config, resume_config, training_stages,
                                validate_config)
        from vps.train.verify import verify_decodable

        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        if args.resume:  # the run's own config; only epochs, runtime.*, cache.dir and cache.validation may change
            config = resume_config(out, args.overrides)
            if is_main:
                print(f"resuming the run in {out} with its saved config.yaml", flush=True)
        else:
            if args.config == DEFAULT_CONFIG and not Path(DEFAULT_CONFIG).is_file():
                raise ConfigError(f"the default config {DEFAULT_CONFIG} is missing (vps is installed without the "
                                  "repository's configs/ folder); pass a config file")
            config = validate_config(apply_overrides(load_config(args.config), args.overrides))
        stages = training_stages(config, args.stage)
        if not args.resume and any(s in stages and (out / f"{s}_last.pt").exists()
                                   for s in ("g", "embedding_prompt", "head")):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if args.resume:
            prepare_resume(out, config, stages, is_main)
        initial = {}
        if config["model"].get("init_from"):  # a wrong path or model fails here, before the data checks
            from vps.modeling.build import initial_weights

            initial = initial_weights(config["model"]["init_from"], config["model"]["sam"]["backend"],
                                      config["model"]["prompt_generator"])
        if is_main:  # one decode of every file is enough; torchrun stops the other processes if it fails
            verify_decodable(training_samples(config))
        from vps.train.trainer import train

        model_path = train(config, out, stages=stages, resume=args.resume, initial=initial)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (every failure is one line; VPS_TRAIN_DEBUG=1 shows the traceback)
        if os.environ.get("VPS_TRAIN_DEBUG"):
            raise
        expected = isinstance(error, (ValueError, OSError))  # ConfigError, DataError, CheckpointError
        message = error_message(error)
        if not expected:
            message = f"{type(error).__name__}: {message} (VPS_TRAIN_DEBUG=1 shows the traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(f"trained model: {model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
