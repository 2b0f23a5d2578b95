"""One command per table of the two papers: trains (or reuses) every row, scores it with vps-eval, prints ours beside
the published numbers.

    python scripts/paper_tables.py --table monuseg            # the AutoSAM paper's MoNuSeg table
    python scripts/paper_tables.py --table polyps             # the same rows on the polyp validation splits
    python scripts/paper_tables.py --table label-efficiency   # Hu et al.'s curve: Dice against training images
    python scripts/paper_tables.py --table monuseg --dry-run  # the plan: rows, vps-train commands, runs reused

Rows: AutoSAM (g + frozen SAM), the light model h(g(I)), Hu et al.'s prompt-free ViT, CNN and linear heads, and the
frozen SAM prompted from the ground truth (a point per object, the mask as mask prompt, AutoSAM's output as mask
prompt, and a box per object as the reference). Each trained row is a run folder under ``--runs`` named by the row
and a hash of its resolved config: a finished run is reused, an unfinished one continues (``vps-train --resume``).
Checkpoints are chosen on a seeded validation split of the training data, never on the test images. Probability maps
are written once per run and test set (large stills in tiles of the training crop's size) and scored with vps-eval;
the printed numbers are read from vps-eval's summary.json. Published numbers: configs/published_numbers.yaml.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # vps and eval from this checkout, as scripts/train_image.sh does
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

import yaml  # noqa: E402

PROG = "paper_tables"
SHARED = REPO.parent / "shared" / "data"
CONFIGS = REPO / "configs" / "train"
PUBLISHED = REPO / "configs" / "published_numbers.yaml"
TABLES = ("monuseg", "polyps", "label-efficiency")
DEFAULT_CONFIGS = {  # table -> (AutoSAM config, prompt-free head config)
    "monuseg": (CONFIGS / "monuseg_litemedsam.yaml", CONFIGS / "monuseg_head_litemedsam.yaml"),
    "polyps": (CONFIGS / "polyp_litemedsam.yaml", CONFIGS / "polyp_head_litemedsam.yaml"),
}
DEFAULT_CONFIGS["label-efficiency"] = DEFAULT_CONFIGS["monuseg"]
DEFAULT_TRAIN = {"monuseg": [SHARED / "monuseg" / "train"], "label-efficiency": [SHARED / "monuseg" / "train"],
                 "polyps": [SHARED / "cvc-clinicdb-video", SHARED / "kvasir-seg"]}
DEFAULT_TEST = SHARED / "monuseg" / "val"
DEFAULT_COUNTS = ("1", "2", "5", "all")
DONE_FILE = "paper_tables.json"  # in a run folder: training seconds, hardware, finished


@dataclass(frozen=True)
class RowKind:
    label: str
    run: Optional[str]       # the run it needs: autosam (g + h), vit, cnn, linear; None: the frozen SAM alone
    model: Optional[str]     # load_model_from_checkpoint's model: autosam, light, head
    baseline: Optional[str]  # vps.modeling.prompts baseline


ROW_KINDS: Dict[str, RowKind] = {
    "g": RowKind("AutoSAM: g + frozen SAM", "autosam", "autosam", None),
    "h": RowKind("light model h(g(I)), no SAM", "autosam", "light", None),
    "vit": RowKind("Hu et al. ViT head (SAM decoder, no prompt)", "vit", "head", None),
    "cnn": RowKind("Hu et al. CNN head", "cnn", "head", None),
    "linear": RowKind("Hu et al. linear head", "linear", "head", None),
    "gt_points": RowKind("SAM + GT point per object", None, None, "gt_points"),
    "gt_mask": RowKind("SAM + GT mask as mask prompt", None, None, "gt_mask"),
    "autosam_mask": RowKind("SAM + AutoSAM output as mask prompt", "autosam", None, "autosam_mask"),
    "gt_boxes": RowKind("SAM + GT box per object (reference)", None, None, "gt_boxes"),
}
TABLE_ROWS = {"monuseg": list(ROW_KINDS), "polyps": list(ROW_KINDS), "label-efficiency": ["g", "vit", "cnn", "linear"]}


class TableError(ValueError):
    """Anything that stops a table: the message is the one line printed."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------------------------
# Runs: one vps-train run folder per trained row, named by the row and a hash of its resolved config


@dataclass
class Run:
    slug: str                  # e.g. monuseg-autosam, monuseg-n2-vit
    config_file: Path
    overrides: List[str]
    config: dict = field(repr=False)
    folder: Path = Path()
    given: Optional[Path] = None  # --autosam-model: a model trained elsewhere, copied into the folder, never trained
    given_epochs: str = ""        # its epochs, from its header or the config beside it

    @property
    def name(self) -> str:
        return self.folder.name

    def state(self) -> str:
        """train (nothing yet), continue (started, not finished) or reuse (finished)."""
        done = read_json(self.folder / DONE_FILE)
        if done.get("finished") and (self.folder / "model.pt").is_file():
            return "reuse"
        return "continue" if (self.folder / "config.yaml").is_file() else "train"

    def command(self, resume: bool) -> List[str]:
        return [sys.executable, "-m", "vps.cli.train", str(self.config_file), *self.overrides, "--out",
                str(self.folder), *(["--resume"] if resume else [])]

    def shown_command(self, resume: bool) -> str:
        return " ".join(shlex.quote(part) for part in ["scripts/train_image.sh", *self.command(resume)[3:]])

    def epochs(self) -> str:
        return self.given_epochs if self.given is not None else config_epochs(self.config)


def config_epochs(config: dict) -> str:
    """"g N, h M" (AutoSAM) or "head N": the epochs of every stage a config trains."""
    from vps.config import training_stages

    return ", ".join(f"{stage} {config[f'train_{stage}']['epochs']}" for stage in training_stages(config))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    temporary.replace(path)


def override(key: str, value) -> str:
    """``key=value`` with the value in YAML's flow style (JSON where that would read back as something else)."""
    text = str(value) if not isinstance(value, (list, dict)) else yaml.safe_dump(
        value, default_flow_style=True, width=1 << 20).strip()
    try:
        plain = yaml.safe_load(text) == value
    except yaml.YAMLError:
        plain = False
    return f"{key}={text if plain else json.dumps(value)}"


def config_hash(config: dict) -> str:
    """What decides the trained weights: the resolved config without runtime.* and cache.dir (which vps-train lets
    change on resume)."""
    config = copy.deepcopy(config)
    config.pop("runtime", None)
    if isinstance(config.get("cache"), dict):
        config["cache"].pop("dir", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def stage_epochs(config: dict, args: argparse.Namespace) -> List[str]:
    """Overrides for every stage's epochs: ``--epochs STAGE=N`` (for a head, its type, e.g. ``linear=N``, before
    ``head=N``) or the config's times ``--epochs-scale``."""
    from vps.config import training_stages

    result = []
    for stage in training_stages(config):
        key = stage
        if stage == "head" and (config["model"].get("head") or {}).get("type") in args.epochs:
            key = config["model"]["head"]["type"]
        epochs = args.epochs.get(key, max(1, round(int(config[f"train_{stage}"]["epochs"]) * args.epochs_scale)))
        result.append(override(f"train_{stage}.epochs", epochs))
    return result


def make_run(slug: str, config_file: Path, overrides: List[str], args: argparse.Namespace) -> Run:
    """The run of ``config_file`` with ``overrides``, the epochs and the user's ``--set`` applied; ``--set`` keys
    that the config does not have are skipped (train_g.* reaches AutoSAM's runs only, train_head.* the heads)."""
    from vps.config import ConfigError, apply_overrides, load_config, validate_config

    base = load_config(config_file)
    overrides = [*overrides, override("cache.dir", str(args.cache_dir)), override("runtime.device", args.device)]
    for setting in args.set:
        try:
            apply_overrides(base, [setting])
        except ConfigError:
            continue
        overrides.append(setting)
        args.set_used.add(setting)
    config = validate_config(apply_overrides(base, overrides))
    epochs = stage_epochs(config, args)
    config = validate_config(apply_overrides(base, overrides + epochs))
    return Run(slug, config_file, overrides + epochs, config, args.runs / f"{slug}-{config_hash(config)}")


def base_config(args: argparse.Namespace) -> dict:
    """The AutoSAM config with the data roots and the user's model.sam settings: the training split, the tile and the
    frozen SAM when no run of the table says otherwise."""
    from vps.config import apply_overrides, load_config, validate_config

    roots = [str(root) for root in args.train]
    settings = [override("data.root", roots[0] if len(roots) == 1 else roots)]
    settings += [s for s in args.set if s.startswith("model.sam.")]
    return validate_config(apply_overrides(load_config(args.autosam_config), settings))


def subset_folder(runs: Path, samples: list, count: int, seed: int, dry_run: bool) -> Path:
    """A stills folder (images/ + masks/, links to the originals) holding ``samples``; made once, named by its files."""
    names = sorted(str(s.image) for s in samples)
    digest = hashlib.sha256(json.dumps([names, seed]).encode()).hexdigest()[:10]
    folder = runs / "subsets" / f"monuseg-n{count}-{digest}"
    if dry_run or (folder / "images").is_dir():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for sample in samples:
        for part, source in (("images", sample.image), ("masks", sample.mask)):
            target = partial / part / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.symlink_to(Path(source).resolve())
            except OSError:  # no links on this file system: a copy
                shutil.copy2(source, target)
    partial.replace(folder)
    return folder


def given_epochs(path: Path, meta: dict) -> str:
    """"g N, h M epochs": from an exported checkpoint's header (scripts/export_model.py), or from the config.yaml of the
    vps-train run folder that holds the checkpoint; "not recorded" otherwise."""
    stages = ", ".join(f"{stage} {meta[f'stage_{stage}']['epochs']}" for stage in ("g", "h")
                       if isinstance(meta.get(f"stage_{stage}"), dict))
    if not stages and (path.parent / "config.yaml").is_file():  # vps-train saved it, validated
        stages = config_epochs(yaml.safe_load((path.parent / "config.yaml").read_text()))
    text = f"{stages} epochs" if stages else "epochs not recorded"
    return text + (" in its last run, which started from another model (model.init_from)" if meta.get("init_from")
                   else "")


def given_autosam_run(args: argparse.Namespace, slug: str) -> Run:
    """The AutoSAM rows from ``--autosam-model`` (a checkpoint trained elsewhere, ``builtin`` for the shipped model):
    a finished run folder named by the file's contents, holding a copy of it, so that every later step (maps, scores,
    the split check of the polyp table) treats it as any reused run. Its SAM must be the table's."""
    from vps.modeling import read_checkpoint
    from vps.modeling.build import default_checkpoint_path

    path = default_checkpoint_path() if str(args.autosam_model) == "builtin" else args.autosam_model
    payload = read_checkpoint(path)  # a one-line CheckpointError when missing or not a vps checkpoint
    meta = payload["meta"]
    if "prompt_generator" not in payload or "surrogate" not in payload:
        raise TableError(f"--autosam-model {path}: not an AutoSAM checkpoint with g and h (a head checkpoint?)")
    config = base_config(args)
    if meta["sam_backend"] != config["model"]["sam"]["backend"]:
        raise TableError(f"--autosam-model {path} was trained with SAM '{meta['sam_backend']}', the table's rows use "
                         f"'{config['model']['sam']['backend']}'")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]
    run = Run(slug, args.autosam_config, [], config, args.runs / f"{slug}-given-{digest}", given=Path(path),
              given_epochs=given_epochs(Path(path), meta))
    if not args.dry_run and run.state() != "reuse":
        run.folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, run.folder / "model.pt.partial")
        (run.folder / "model.pt.partial").replace(run.folder / "model.pt")
        write_atomic(run.folder / DONE_FILE, json.dumps(
            {"finished": True, "given": str(path), "hardware": "trained elsewhere"},
            indent=2) + "\n")
    return run


def plan_runs(args: argparse.Namespace, rows: Sequence[str]) -> Dict[Tuple[str, str], Run]:
    """{(run kind, count): Run} for every run the table's rows need; count is "all" except in label-efficiency."""
    from vps.train.trainer import split_images

    autosam_config, head_config = args.autosam_config, args.head_config
    dataset = "polyps" if args.table == "polyps" else "monuseg"
    roots = [str(root) for root in args.train]
    root_value = roots[0] if len(roots) == 1 else roots
    kinds = sorted({ROW_KINDS[row].run for row in rows if ROW_KINDS[row].run}, key=["autosam", "vit", "cnn",
                                                                                     "linear"].index)
    counts = args.counts if args.table == "label-efficiency" else ["all"]
    runs: Dict[Tuple[str, str], Run] = {}
    base = base_config(args)
    # the papers' AutoSAM: g alone gives SAM its prompt (vps's second prompt generator is MODEL_CARD.md's)
    paper_autosam = [override("model.embedding_prompt", None)] if base["model"].get("embedding_prompt") else []
    seed = int(base["data"].get("split_seed", 0))
    train_samples, val_samples = split_images(base) if args.table == "label-efficiency" else ([], [])
    args.counts_used = {"all": len(train_samples)}
    for count in counts:
        data = [override("data.root", root_value)]
        tag = dataset
        if count != "all":
            number = int(count)
            if number > len(train_samples):
                raise TableError(f"--counts {count}: the training split of {roots[0]} holds only "
                                 f"{len(train_samples)} images (the rest is its validation split)")
            order = sorted(train_samples, key=lambda s: s.image.name)
            random.Random(f"{seed}:label-efficiency").shuffle(order)  # nested: n=2 holds n=1's image
            folder = subset_folder(args.runs, order[:number] + val_samples, number, seed, args.dry_run)
            args.counts_used[count] = number
            data = [override("data.root", str(folder)),
                    override("data.val_clips", sorted(s.group for s in val_samples))]
            tag = f"{dataset}-n{number}"
        for kind in kinds:
            if kind == "autosam" and args.autosam_model is not None:
                runs[kind, count] = given_autosam_run(args, f"{tag}-autosam")
            elif kind == "autosam":
                runs[kind, count] = make_run(f"{tag}-autosam", autosam_config, paper_autosam + data, args)
            else:
                runs[kind, count] = make_run(f"{tag}-{kind}", head_config,
                                             [override("model.head", {"type": kind}), *data], args)
    return runs


def hardware(device) -> str:
    import torch

    from vps.hardware import cpu_name

    where = f"{cpu_name()} ({os.cpu_count()} logical cores)"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    return f"{where}, torch {torch.__version__}"


def train_runs(runs: Sequence[Run], args: argparse.Namespace, where: str) -> Dict[str, str]:
    """Trains or continues every run not finished; returns {run name: what happened}."""
    happened = {}
    todo = [run for run in runs if run.state() != "reuse"]
    for number, run in enumerate(todo, 1):
        resume = run.state() == "continue"
        print(f"\n[{number}/{len(todo)}] {'continuing' if resume else 'training'} {run.name} "
              f"({run.epochs()} epochs)\n{run.shown_command(resume)}", flush=True)
        done = read_json(run.folder / DONE_FILE)
        started, result = time.perf_counter(), None
        try:
            result = subprocess.run(run.command(resume))
        finally:  # also when interrupted: the time spent counts
            seconds = float(done.get("seconds", 0.0)) + time.perf_counter() - started
            write_atomic(run.folder / DONE_FILE, json.dumps(
                {"finished": result is not None and result.returncode == 0, "seconds": round(seconds, 1),
                 "hardware": where, "command": run.shown_command(False)}, indent=2) + "\n")
        if result.returncode != 0:
            raise TableError(f"vps-train failed for {run.name} (exit status {result.returncode}; its error is above)")
        happened[run.name] = "continued now" if resume else "trained now"
    return happened


# ---------------------------------------------------------------------------------------------------------------
# Test sets, probability maps and vps-eval


@dataclass
class TestSet:
    name: str
    samples: list
    tile: Optional[int]
    folder: Path = Path()

    @property
    def stills(self) -> Dict[str, bool]:
        from vps.validation import sources_are_stills

        return sources_are_stills(self.samples)


def make_test_set(name: str, samples: list, tile: Optional[int], runs: Path) -> TestSet:
    if not samples:
        raise TableError(f"the test set {name} holds no images")
    key = hashlib.sha256(json.dumps([sorted(str(s.image) for s in samples), tile]).encode()).hexdigest()[:10]
    return TestSet(name, samples, tile, runs / "testsets" / f"{name}-{key}")


def test_sets(args: argparse.Namespace, runs: Dict[Tuple[str, str], Run]) -> List[TestSet]:
    """MoNuSeg: every image of --test. Polyps: the validation split recorded in a trained run's checkpoint (from the
    config before any run has finished)."""
    from vps.modeling import read_checkpoint
    from vps.train.data import discover_samples
    from vps.train.trainer import split_images
    from vps.validation import sources_are_stills, validation_samples

    if args.table != "polyps":
        crop = base_config(args)["data"].get("random_crop") or {}
        tile = args.tile if args.tile is not None else crop.get("size")
        return [make_test_set(f"monuseg-{args.test.name}", discover_samples(args.test), tile or None, args.runs)]
    splits = {run.name: read_checkpoint(run.folder / "model.pt")["meta"] for run in runs.values()
              if run.state() == "reuse"}
    named = {json.dumps(meta.get("val_clips")) for meta in splits.values()}
    if len(named) > 1:
        raise TableError(f"the runs {', '.join(splits)} were validated on different splits; use one data.root, "
                         "val_fraction and split_seed for every row")
    if splits:
        positives, _ = validation_samples(next(iter(splits.values())), args.train)
    else:  # before training: the split the runs will draw
        positives = split_images(next(iter(runs.values())).config if runs else base_config(args))[1]
    tile = args.tile or None
    return [make_test_set(f"polyps-{source}", [s for s in positives if s.source == source], tile, args.runs)
            for source in sorted(sources_are_stills(positives))]


@dataclass
class Row:
    key: str           # ROW_KINDS key
    count: str         # "all", or the number of training images (label-efficiency)
    run: Optional[Run]
    maps_base: Path    # <run or SAM folder>/maps: one folder per test set and row below it

    @property
    def kind(self) -> RowKind:
        return ROW_KINDS[self.key]

    def maps(self, test_set: TestSet) -> Path:
        return self.maps_base / test_set.folder.name / self.key


def sam_settings(config: dict) -> dict:
    return {**config["model"]["sam"], "seed": int(config.get("runtime", {}).get("seed", 0))}


def table_sam(args: argparse.Namespace, runs: Sequence[Run]) -> dict:
    """The frozen SAM every row of the table uses (model.sam and the seed of its runs' configs)."""
    settings = {json.dumps(sam_settings(run.config), sort_keys=True): run.name for run in runs}
    if len(settings) > 1:
        raise TableError(f"the runs {', '.join(settings.values())} use different SAMs (model.sam or runtime.seed); "
                         "one table compares heads on one frozen SAM")
    return sam_settings(runs[0].config if runs else base_config(args))


def make_rows(args: argparse.Namespace, row_keys: Sequence[str], runs: Dict[Tuple[str, str], Run], sam: dict
              ) -> List[Row]:
    counts = args.counts if args.table == "label-efficiency" else ["all"]
    sam_folder = args.runs / f"sam-{hashlib.sha256(json.dumps(sam, sort_keys=True).encode()).hexdigest()[:10]}" / "maps"
    rows = []
    for count in counts:
        for key in row_keys:
            run = runs.get((ROW_KINDS[key].run, count)) if ROW_KINDS[key].run else None
            rows.append(Row(key, count, run, run.folder / "maps" if run else sam_folder))
    return rows


def build_sam_from(settings: dict):
    """The frozen SAM of a run's config (model.sam), with the seed training used (random test SAMs match)."""
    import torch

    from vps.modeling import build_sam

    settings = dict(settings)
    seed = settings.pop("seed")
    torch.manual_seed(seed)
    return build_sam(settings.pop("backend"), settings.pop("checkpoint", None), **settings)


def write_maps(rows: Sequence[Row], test_set: TestSet, args: argparse.Namespace, sam_config: dict) -> int:
    """Probability maps of every row whose maps for ``test_set`` are missing, and the ground truth; each folder is
    written under a temporary name and renamed when complete. Returns the number of rows computed."""
    import numpy as np
    import torch

    from vps.inference import resolve_device
    from vps.modeling import load_model_from_checkpoint
    from vps.progress import Progress
    from vps.train.cache import EmbeddingCache, sam_cache_id
    from vps.train.data import read_pair
    from vps.validation import ModelMethod, PromptMethod, WindowEmbeddings, method_maps, relative_path, save_png

    gt = test_set.folder / "gt"
    pending = [row for row in rows if not row.maps(test_set).is_dir()]
    if not pending and gt.is_dir():
        return 0
    device = resolve_device(args.device)
    sam = build_sam_from(sam_config).to(device)
    cache = EmbeddingCache(args.cache_dir, sam_cache_id(sam_config["backend"], sam_config.get("checkpoint")))
    embed = WindowEmbeddings(sam, cache)
    loaded: Dict[Tuple[str, str], ModelMethod] = {}

    def model_method(row: Row, model: str) -> ModelMethod:
        if (row.run.name, model) not in loaded:
            network = load_model_from_checkpoint(row.run.folder / "model.pt", model, sam=sam).to(device).eval()
            loaded[row.run.name, model] = ModelMethod(f"{row.run.name}/{model}", network)
        return loaded[row.run.name, model]

    methods, folders = [], {}
    for row in pending:
        if row.kind.baseline is None:
            method = model_method(row, row.kind.model)
        else:
            autosam = model_method(row, "autosam") if row.kind.baseline == "autosam_mask" else None
            method = PromptMethod(str(row.maps(test_set)), sam, row.kind.baseline, autosam)
        methods.append(method)
        folders[method.name] = row.maps(test_set).with_name(row.key + ".partial")
        shutil.rmtree(folders[method.name], ignore_errors=True)  # left by an interrupted run
    gt_partial = gt.with_name("gt.partial")
    shutil.rmtree(gt_partial, ignore_errors=True)
    write_gt = not gt.is_dir()
    stills = test_set.stills
    tiles = f", tiles of {test_set.tile} px" if test_set.tile else ""
    progress = Progress(f"{test_set.name}: maps of {len(methods)} rows{tiles}", len(test_set.samples), "img",
                        prefix=PROG)
    with torch.inference_mode():
        for sample in test_set.samples:
            image, mask = read_pair(sample)
            name = relative_path(sample, stills[sample.source])
            if methods:
                for method_name, array in method_maps(image, mask, methods, embed, test_set.tile).items():
                    save_png(array, folders[method_name] / name)
            if write_gt:
                save_png(mask.astype(np.uint8) * 255, gt_partial / name)
            progress.update(1)
    progress.close()
    for row, method in zip(pending, methods):
        folders[method.name].replace(row.maps(test_set))
    if write_gt:
        gt_partial.replace(gt)
    print(f"{test_set.name}: SAM embeddings of {embed.reused} windows from the cache, {embed.encoded} encoded here",
          flush=True)
    return len(methods)


def score(rows: Sequence[Row], test_set: TestSet, out: Path) -> Dict[int, dict]:
    """vps-eval on every row's maps, one call per source: {row index: {source: summary}}."""
    from vps.validation import run_vps_eval

    scores: Dict[int, dict] = {i: {} for i in range(len(rows))}
    for source, stills in sorted(test_set.stills.items()):
        summaries = run_vps_eval(test_set.folder / "gt" / source, [row.maps(test_set) / source for row in rows],
                                 "image" if stills else "video", out / "eval" / test_set.folder.name / source)
        for i, summary in enumerate(summaries.values()):
            scores[i][source] = summary
    return scores


# ---------------------------------------------------------------------------------------------------------------
# The printed tables


def percent(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def published_text(entry: dict, metric: str) -> str:
    return "-" if entry.get(metric) is None else f"{float(entry[metric]):.1f}"


def run_time(row: Row, happened: Dict[str, str]) -> str:
    if row.run is None:
        return "-"
    if row.run.given is not None:
        return "given"
    seconds = read_json(row.run.folder / DONE_FILE).get("seconds")
    return f"{seconds:.0f} s, {happened.get(row.run.name, 'reused')}" if seconds is not None else "-"


def runs_block(runs: Sequence[Run], happened: Dict[str, str]) -> str:
    """Each run's training: epochs, wall time of its vps-train calls, whether it ran now, the hardware it ran on."""
    lines = ["Runs (wall time of their vps-train calls, on the hardware each recorded):"]
    for run in runs:
        if run.given is not None:
            lines.append(f"  {run.name}: {run.epochs()}, given: {run.given} (--autosam-model; its training is "
                         "recorded with it, not timed here)")
            continue
        done = read_json(run.folder / DONE_FILE)
        lines.append(f"  {run.name}: {run.epochs()} epochs, {done.get('seconds', float('nan')):.0f} s, "
                     f"{happened.get(run.name, 'reused')}; {done.get('hardware', 'hardware not recorded')}")
    return "\n".join(lines)


def results_table(args, rows, sets, scores, published, happened) -> Tuple[str, list]:
    """The MoNuSeg / polyp table: one block per test set, one line per row (published-only rows first)."""
    import pandas as pd

    lines, records = [], []
    entries = published.get("tables", {}).get(args.table) or {}
    for set_index, test_set in enumerate(sets):
        table = []
        for key, entry in entries.items():
            if key not in ROW_KINDS:
                table.append({"method": entry.get("label", key), "Dice": "-", "IoU": "-", "meanDice": "-",
                              "meanIoU": "-", "paper Dice": published_text(entry, "Dice"),
                              "paper IoU": published_text(entry, "IoU"), "training": "-"})
        for i, row in enumerate(rows):
            for source, summary in scores[set_index][i].items():
                entry = entries.get(row.key) or {}
                table.append({"method": row.kind.label, "Dice": percent(summary["Dice@0.5"]),
                              "IoU": percent(summary["IoU@0.5"]), "meanDice": percent(summary["meanDice"]),
                              "meanIoU": percent(summary["meanIoU"]), "paper Dice": published_text(entry, "Dice"),
                              "paper IoU": published_text(entry, "IoU"), "training": run_time(row, happened)})
                records.append({"table": args.table, "test_set": test_set.name, "source": source, "row": row.key,
                                "method": row.kind.label, "run": row.run.name if row.run else "",
                                **{k: summary[k] for k in ("Dice@0.5", "IoU@0.5", "meanDice", "meanIoU")},
                                "published_Dice": entry.get("Dice"), "published_IoU": entry.get("IoU")})
        protocol = "image" if all(test_set.stills.values()) else "video"
        tiles = f", tiles of {test_set.tile} px" if test_set.tile else ""
        lines += [f"\n{test_set.name}: {len(test_set.samples)} images, {protocol} protocol{tiles} (vps-eval, %)",
                  pd.DataFrame(table).set_index("method").to_string()]
    return "\n".join(lines), records


def efficiency_table(args, rows, sets, scores, counts_used) -> Tuple[str, list]:
    """Hu et al.'s label-efficiency table: methods x number of training images, Dice@0.5 on the test set."""
    import pandas as pd

    table, records = {}, []
    for i, row in enumerate(rows):
        for source, summary in scores[0][i].items():
            column = f"n={counts_used[row.count]}"
            table.setdefault(row.kind.label, {})[column] = percent(summary["Dice@0.5"])
            records.append({"table": args.table, "test_set": sets[0].name, "source": source, "row": row.key,
                            "method": row.kind.label, "run": row.run.name, "images": counts_used[row.count],
                            **{k: summary[k] for k in ("Dice@0.5", "IoU@0.5", "meanDice", "meanIoU")}})
    frame = pd.DataFrame.from_dict(table, orient="index").rename_axis("method")
    tiles = f", tiles of {sets[0].tile} px" if sets[0].tile else ""
    return (f"\n{sets[0].name}: Dice (%) at threshold 0.5 against the number of training images "
            f"({len(sets[0].samples)} test images, image protocol{tiles}, vps-eval)\n{frame.to_string()}"), records


def efficiency_plot(records: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    for method in dict.fromkeys(r["method"] for r in records):
        points = sorted((r["images"], r["Dice@0.5"]) for r in records if r["method"] == method)
        axes.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=method)
    axes.set(xscale="log", xlabel="training images", ylabel="Dice (%) at 0.5", title="Label efficiency (vps-eval)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".partial.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = _OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, choices=TABLES)
    parser.add_argument("--runs", type=Path, default=Path("~/.cache/vps/paper-runs"),
                        help="one run folder per trained row, reused across invocations (default %(default)s)")
    parser.add_argument("--out", type=Path, help="where the table, its CSV and plot go (default RUNS/tables/TABLE)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/vps/embeddings"),
                        help="SAM embedding cache for training and the maps (default %(default)s)")
    parser.add_argument("--train", type=Path, nargs="+",
                        help="training data roots (default: ../shared/data/monuseg/train; polyps: the CVC clips and "
                             "Kvasir-SEG); a seeded split of them chooses checkpoints")
    parser.add_argument("--test", type=Path, default=DEFAULT_TEST,
                        help="monuseg, label-efficiency: the test images (default %(default)s); polyps are scored on "
                             "the validation split recorded in the checkpoints")
    parser.add_argument("--autosam-config", type=Path, help="the AutoSAM rows' config (g and h)")
    parser.add_argument("--head-config", type=Path, help="the prompt-free heads' config")
    parser.add_argument("--autosam-model", type=Path, metavar="CHECKPOINT",
                        help="monuseg, polyps: the AutoSAM rows (g, h, autosam_mask) from this trained g + h checkpoint "
                             "instead of a run trained here ('builtin': the shipped polyp model); it must have been "
                             "validated on the table's split")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help=f"only these rows ({', '.join(ROW_KINDS)})")
    parser.add_argument("--counts", nargs="+", default=list(DEFAULT_COUNTS),
                        help="label-efficiency: numbers of training images, or 'all' (default %(default)s)")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="every stage's epochs times this, rounded, at least 1 (default 1: the configs' recipe)")
    parser.add_argument("--epochs", nargs="+", default=[], metavar="STAGE=N",
                        help="epochs of a stage (g, h, head) for every run, instead of --epochs-scale; vit=N, cnn=N "
                             "or linear=N for one head, before head=N")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run whose config has the key (e.g. model.sam.backend=vit_b "
                             "model.sam.checkpoint=sam_vit_b.pth); repeatable")
    parser.add_argument("--tile", type=int, help="tile side for the test images (default: the configs' training crop "
                                                 "size for MoNuSeg, whole images for polyps; 0: whole images)")
    parser.add_argument("--device", default="auto", help="training and maps: auto, cpu or cuda (default auto)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit: nothing is trained or written")
    args = parser.parse_args(argv)
    args.runs = args.runs.expanduser().resolve()
    args.cache_dir = args.cache_dir.expanduser().resolve()
    args.out = (args.out.expanduser() if args.out else args.runs / "tables" / args.table).resolve()
    args.train = [p.expanduser().resolve() for p in (args.train or DEFAULT_TRAIN[args.table])]
    args.test = args.test.expanduser().resolve()
    default_autosam, default_head = DEFAULT_CONFIGS[args.table]
    args.autosam_config = (args.autosam_config or default_autosam).resolve()
    args.head_config = (args.head_config or default_head).resolve()
    rows = args.rows or TABLE_ROWS[args.table]
    unknown = [row for row in rows if row not in TABLE_ROWS[args.table]]
    if unknown:
        parser.error(f"--rows: {', '.join(unknown)} not in the {args.table} table "
                     f"({', '.join(TABLE_ROWS[args.table])})")
    args.row_keys = list(dict.fromkeys(rows))
    try:
        args.epochs = {stage: int(n) for stage, n in (item.split("=", 1) for item in args.epochs)}
    except ValueError:
        parser.error("--epochs takes STAGE=N, e.g. g=20 h=10 head=30")
    if set(args.epochs) - {"g", "h", "head", "vit", "cnn", "linear"} or any(n < 1 for n in args.epochs.values()):
        parser.error("--epochs: the stages are g, h and head (or one head: vit, cnn, linear), each with at least "
                     "1 epoch")
    if args.epochs_scale <= 0:
        parser.error("--epochs-scale must be > 0")
    bad = [c for c in args.counts if c != "all" and not (c.isdigit() and int(c) >= 1)]
    if bad:
        parser.error(f"--counts: {', '.join(bad)} is neither a number of images >= 1 nor 'all'")
    if args.autosam_model is not None and args.table == "label-efficiency":
        parser.error("--autosam-model: the label-efficiency curve trains g on each number of images")
    if args.autosam_model is not None and str(args.autosam_model) != "builtin":
        args.autosam_model = args.autosam_model.expanduser().resolve()
    if args.tile is not None and args.tile < 0:
        parser.error("--tile must be >= 0")
    malformed = [s for s in args.set if "=" not in s]
    if malformed:
        parser.error(f"--set {malformed[0]}: expected KEY=VALUE, e.g. model.sam.backend=vit_b")
    args.set_used = set()
    return args


def check_inputs(args: argparse.Namespace) -> None:
    for path in (args.autosam_config, args.head_config, PUBLISHED):
        if not path.is_file():
            raise TableError(f"config file not found: {path}")
    for root in args.train + ([args.test] if args.table != "polyps" else []):
        if not root.is_dir():
            raise TableError(f"data folder not found: {root}")
    if args.table != "polyps" and any(args.test == root or root in args.test.parents for root in args.train):
        raise TableError(f"the test images {args.test} lie in the training data")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return tables(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the same command continues (finished runs are kept, unfinished ones resume)",
              file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (one line; PAPER_TABLES_DEBUG=1 shows the traceback)
        if os.environ.get("PAPER_TABLES_DEBUG"):
            raise
        from vps.cli.train import error_message

        message = error_message(error)
        if not isinstance(error, (ValueError, OSError)):  # TableError, ConfigError, DataError, CheckpointError, ...
            message = f"{type(error).__name__}: {message} (PAPER_TABLES_DEBUG=1 shows the traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


def tables(args: argparse.Namespace) -> int:
    import vps  # noqa: F401  (torchvision compatibility before timm loads)
    from vps.inference import resolve_device

    check_inputs(args)
    published = yaml.safe_load(PUBLISHED.read_text()) or {}
    device = resolve_device(args.device)
    where = hardware(device)
    runs = plan_runs(args, args.row_keys)
    unused = [s for s in args.set if s not in args.set_used and not s.startswith("model.sam.")]
    if unused:
        raise TableError(f"--set {unused[0]}: no run's config has that key")
    ordered = list(runs.values())
    sam = table_sam(args, ordered)
    rows = make_rows(args, args.row_keys, runs, sam)
    states = {run.name: run.state() for run in ordered}
    sets = test_sets(args, runs)

    print(f"{PROG} --table {args.table}: {len(rows)} rows, {len(ordered)} runs in {args.runs}\nhardware: {where}")
    for run in ordered:
        if run.given is not None:
            print(f"  run {run.name}: given (--autosam-model {run.given}); nothing to train")
            continue
        resume = states[run.name] == "continue"
        action = {"reuse": "reuse", "continue": "continue (vps-train --resume)", "train": "train"}[states[run.name]]
        print(f"  run {run.name}: {action}; {run.epochs()} epochs\n    {run.shown_command(resume)}")
    for key in args.row_keys:
        kind = ROW_KINDS[key]
        used = [row.run.name for row in rows if row.key == key and row.run]
        print(f"  row {key}: {kind.label}; " + (f"run {', '.join(used)}" if used else "the frozen SAM alone"))
    for test_set in sets:
        missing = sum(not row.maps(test_set).is_dir() for row in rows)
        tiles = f", tiles of {test_set.tile} px" if test_set.tile else ", whole images"
        print(f"  test set {test_set.name}: {len(test_set.samples)} images{tiles}; maps of {missing} of {len(rows)} "
              f"rows to compute")
    if args.dry_run:
        print("dry run: nothing trained or written")
        return 0

    happened = train_runs(ordered, args, where)
    if args.table == "polyps" and any(states[run.name] != "reuse" for run in ordered):
        sets = test_sets(args, runs)  # now from the checkpoints
    started = time.perf_counter()
    computed = sum(write_maps(rows, test_set, args, sam) for test_set in sets)
    map_seconds = time.perf_counter() - started
    scores = [score(rows, test_set, args.out) for test_set in sets]

    if args.table == "label-efficiency":
        text, records = efficiency_table(args, rows, sets, scores, args.counts_used)
        text += ("\nHu et al. (2023) measure this curve on ACDC cardiac MRI, not on MoNuSeg: no published number is "
                 "comparable (configs/published_numbers.yaml).")
    else:
        text, records = results_table(args, rows, sets, scores, published, happened)
        notes = [f"  {ROW_KINDS[k].label if k in ROW_KINDS else e.get('label', k)}: {e['note']}"
                 for k, e in ((published.get("tables", {}).get(args.table)) or {}).items() if e.get("note")]
        text += ("\nDice, IoU: per-image Dice and IoU of the mask at threshold 0.5, averaged (the papers' protocol); "
                 "meanDice, meanIoU: vps-eval's mean over thresholds. paper: configs/published_numbers.yaml, '-' where "
                 "no checked number exists." + ("\n" + "\n".join(notes) if notes else ""))
    if ordered:
        text += "\n" + runs_block(ordered, happened)
    text += f"\nMaps of {computed} rows written in {map_seconds:.0f} s ({where})."
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "table.txt", text.lstrip("\n") + "\n")
    import pandas as pd

    temporary = args.out / "table.partial.csv"
    pd.DataFrame(records).to_csv(temporary, index=False)
    temporary.replace(args.out / "table.csv")
    if args.table == "label-efficiency":
        efficiency_plot(records, args.out / "label_efficiency.png")
    print(f"written: {args.out / 'table.txt'}, table.csv" + (", label_efficiency.png" if args.table ==
                                                              "label-efficiency" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
