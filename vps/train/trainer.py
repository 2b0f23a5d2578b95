"""Training AutoSAM's prompt generator g (stage 1), its second prompt generator on SAM's embedding (optional,
``embedding_prompt``) and the surrogate decoder h (stage 2), or a prompt-free head on the frozen SAM embedding
(one stage, ``head``)."""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler

from vps.backends import image_encoder
from vps.config import ConfigError, class_names, save_config
from vps.inference import autocast_dtype, resolve_device, resolve_precision
from vps.modeling import (AutoSAM, build_embedding_prompt, build_prompt_generator, build_sam, build_surrogate,
                          checkpoint_metadata, save_checkpoint)
from vps.modeling.build import (embedding_prompt_settings, initial_weights, load_weights, read_checkpoint,
                                with_embedding_prompt, without_embedding_prompt)
from vps.modeling.build_head import build_head, head_settings
from vps.progress import Progress
from vps.train.augment import AUGMENT_ON, BatchAugment, build_geometric, build_photometric
from vps.train.cache import EmbeddingCache, sam_cache_id
from vps.train.crops import random_crops
from vps.train.data import as_root_list, split_sources
from vps.train.dataset import SegmentationDataset, fill_cache, missing_embeddings
from vps.train.negatives import polyp_free_crops

MODEL_FILE = "model.pt"
CACHE_FILL_BATCH = 4  # images per pass of SAM's encoder when filling the embedding cache
PLOT_INTERVAL_SECONDS = 30.0


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Unweighted BCE on logits + soft Dice on probabilities; logits and target B x K x H x W (K classes, each
    its own sigmoid; the Dice is computed per image and class, then averaged)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probabilities = torch.sigmoid(logits).flatten(2)
    target = target.flatten(2)
    dice = (2 * (probabilities * target).sum(-1) + eps) / (probabilities.sum(-1) + target.sum(-1) + eps)
    return bce + (1 - dice).mean()


def binary_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of (sigmoid > 0.5) against the target, averaged over the K class channels: B values; two
    empty masks score 1."""
    prediction = (logits.float() > 0).flatten(2).float()
    target = target.flatten(2)
    overlap = (prediction * target).sum(-1)
    total = prediction.sum(-1) + target.sum(-1)
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1e-9), torch.ones_like(total)).mean(1)


@dataclass
class Runtime:
    """Device, precision and the distributed context (from torchrun's RANK/WORLD_SIZE/LOCAL_RANK)."""

    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        dtype = autocast_dtype(self.precision, self.device)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size


def setup_runtime(config: Dict[str, Any]) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.get("device", "auto"), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(config.get("precision", "auto"), device)
    autocast_dtype(precision, device)  # rejects unknown names and fp16 on CPU, with a one-line message
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, precision=precision, rank=rank, world_size=world_size)


def augments_on_device(setting: str, device: torch.device, num_workers: int) -> bool:
    """``runtime.augment_on``: ``device`` augments each training batch on the training device, ``loader`` in the
    DataLoader's workers. ``auto`` is ``loader`` unless a CUDA run has no workers: on an H200 the batch
    augmentation adds 46 % to a step, while two workers' CPU threads keep up with it; without workers the main
    thread would augment on its CPU, 3.6x-4.3x slower than the GPU (scripts/bench_train_augment.py,
    docs/training.md)."""
    if setting not in AUGMENT_ON:
        raise ValueError(f"runtime.augment_on must be auto, loader or device, got {setting!r}")
    return setting == "device" or (setting == "auto" and device.type == "cuda" and num_workers == 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochLog:
    """Per-epoch CSV (epoch, lr, train_loss, val_loss, val_dice, one Dice column per validation source,
    seconds) and a PNG plot beside it."""

    FIELDS = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "seconds"]

    def __init__(self, path: Path, sources: Sequence[str] = ()) -> None:
        self.path = path
        self.fields = self.FIELDS[:5] + [f"val_dice_{s}" for s in sources] + self.FIELDS[5:]

    def rows(self) -> List[Dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open() as handle:
            return list(csv.DictReader(handle))

    def append(self, row: Dict[str, float], keep_epochs_below: int, plot: bool = True) -> None:
        """Append a row, first dropping rows of epochs >= keep_epochs_below (left by a killed run); redraw the
        plot when ``plot``."""
        rows = [r for r in self.rows() if int(r["epoch"]) < keep_epochs_below] + [
            {k: f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in self.fields if k in row}]
        temporary = self.path.with_name(self.path.name + ".partial")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        temporary.replace(self.path)
        if plot:
            self.plot(rows)

    def plot(self, rows: List[Dict[str, str]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [int(r["epoch"]) for r in rows]
        figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
        loss_axes.plot(epochs, [float(r["train_loss"]) for r in rows], label="train")
        loss_axes.plot(epochs, [float(r["val_loss"]) for r in rows], label="validation")
        loss_axes.set(xlabel="epoch", ylabel="BCE + Dice loss")
        loss_axes.legend()
        dice_axes.plot(epochs, [float(r["val_dice"]) for r in rows], color="black", label="selection score")
        for field in self.fields:
            if field.startswith("val_dice_"):
                dice_axes.plot(epochs, [float(r.get(field) or "nan") for r in rows], label=field[len("val_dice_"):])
        dice_axes.set(xlabel="epoch", ylabel="validation Dice @0.5", ylim=(0, 1))
        dice_axes.legend(fontsize=7)
        figure.suptitle(self.path.stem)
        figure.tight_layout()
        figure.savefig(self.path.with_suffix(".png"), dpi=100)
        plt.close(figure)


def learning_rate(settings: Dict[str, Any], epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The stage's learning rate for batch ``step`` (0-based) of ``epoch`` (0-based) in an epoch of
    ``steps_per_epoch`` batches: constant, or linear warm-up then cosine decay to ``min_lr``.

    ``schedule_by: epoch`` (the default): one rate for the whole epoch, ``min_lr`` at the last epoch.
    ``schedule_by: step``: the same curve at every batch, ``min_lr`` after the last one (warm-up from the first
    batch, no jump in rate between epochs). Either is a function of the position alone, so a resumed run continues
    the same curve."""
    base = float(settings["lr"])
    schedule = settings.get("schedule", "constant")
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule '{schedule}'; expected constant or cosine")
    epochs, warmup = int(settings["epochs"]), int(settings.get("warmup_epochs", 0))
    minimum = float(settings.get("min_lr", 0.0))
    by = settings.get("schedule_by", "epoch")
    if by == "epoch":
        if epoch < warmup:
            return base * (epoch + 1) / (warmup + 1)
        progress = (epoch - warmup) / max(1, epochs - 1 - warmup)
    elif by == "step":
        position = epoch + step / max(1, steps_per_epoch)  # epochs done before this batch
        if position < warmup:
            return base * (position + 1 / max(1, steps_per_epoch)) / warmup
        progress = (position - warmup) / max(1e-9, epochs - warmup)
    else:
        raise ValueError(f"unknown schedule_by '{by}'; expected epoch or step")
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * min(1.0, progress)))


def learning_rate_depends_on_epochs(settings: Dict[str, Any], epoch: int) -> bool:
    """Whether some rate of ``epoch`` changes with ``settings["epochs"]``: on a cosine curve past its warm-up (by
    epoch: the warm-up epochs and the first epoch after them start at the same rates whatever the count; by step:
    every batch after the warm-up)."""
    if settings.get("schedule", "constant") != "cosine":
        return False
    warmup = int(settings.get("warmup_epochs", 0))
    return epoch >= warmup if settings.get("schedule_by", "epoch") == "step" else epoch > warmup


def _loader(dataset, batch_size: int, runtime: Runtime, shuffle: bool, num_workers: int, seed: int):
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if runtime.distributed and shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, drop_last=False, persistent_workers=num_workers > 0,
                      pin_memory=runtime.device.type == "cuda")


def run_stage(
    name: str,
    trainable: nn.Module,
    forward: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor],
    train_loader: DataLoader,
    val_loader: Optional[DataLoader],
    settings: Dict[str, Any],
    runtime: Runtime,
    out_dir: Path,
    on_best: Callable[[nn.Module], None],
    resume: bool,
    starts_trained: bool = False,
    augment: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
    validate: Optional[Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]] = None,
) -> Dict[str, Any]:
    """Train ``trainable`` with Adam (``settings["optimizer"]``: adam, or adamw for decoupled weight decay) on
    BCE + Dice; checkpoint every epoch; call ``on_best(module)`` on a new best with the module whose weights were
    scored.

    The state file ``<name>_last.pt`` (weights, optimiser, epoch, best score, RNG, epoch count) is rewritten
    atomically after every epoch, so a run killed at any moment resumes losing at most one epoch.
    ``starts_trained`` (weights from ``model.init_from``): the starting weights are validated first and count as
    epoch 0, so a fine-tuning run that only makes the model worse keeps the model it started from.
    ``augment``: applied to each training batch on the device (``runtime.augment_on: device``).
    ``validate``: the forward scored on the validation set when it is not ``forward`` (the embedding prompt head
    is trained alone but chosen on the model it joins).
    ``settings["max_minutes"]``: after the second epoch (or the first, where the next epoch's learning rate depends
    on the epoch count), the epoch count is cut to what fits in that many minutes at the last epoch's pace (never
    raised), so the learning-rate schedule still ends at the last epoch; a resumed run keeps that count.
    ``settings["ema_decay"]``: validate, keep and save an exponential moving average of the weights (BatchNorm
    statistics included), updated after every step from the starting weights, instead of the last step's weights.
    """
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    optimizer = optimizers[settings.get("optimizer", "adam")](trainable.parameters(), lr=float(settings["lr"]),
                                                              weight_decay=float(settings["weight_decay"]))
    validate = validate or forward
    scaler = torch.amp.GradScaler(enabled=runtime.precision == "fp16")
    state_path = out_dir / f"{name}_last.pt"
    log = EpochLog(out_dir / f"log_{name}.csv", val_loader.dataset.sources if val_loader else ())
    start_epoch, best, fitted_epochs = 0, {"dice": -1.0, "epoch": -1}, None
    budget = settings.get("max_minutes")
    epochs = int(settings["epochs"])
    averaged = (AveragedModel(trainable, multi_avg_fn=get_ema_multi_avg_fn(float(settings["ema_decay"])),
                              use_buffers=True) if settings.get("ema_decay") else None)
    scored = averaged.module if averaged is not None else trainable
    resuming = resume and state_path.is_file()
    if resuming:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        trainable.load_state_dict(state["module"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        torch.set_rng_state(state["torch_rng"])
        fitted_epochs = state.get("fitted_epochs")
        if budget and fitted_epochs:  # the run's own curve, not a new fit to the time left
            epochs = min(epochs, int(fitted_epochs))
        if runtime.is_main:
            total = epochs
            print(f"resuming stage {name} after epoch {start_epoch} of {total} (best validation Dice "
                  f"{best['dice']:.4f})" if start_epoch < total else
                  f"stage {name} already finished its {start_epoch} epochs; nothing to train")
    elif starts_trained and val_loader is not None:
        start_loss, start_dice, by_source = evaluate(trainable, validate, val_loader, runtime)
        if runtime.is_main:
            best = {"dice": start_dice, "epoch": -1}
            on_best(trainable)
            # epoch 0 of the log: the starting model, which a fine-tuning that only gets worse keeps
            log.append({"epoch": 0, "lr": 0.0, "train_loss": float("nan"), "val_loss": start_loss,
                        "val_dice": start_dice, "seconds": 0.0, **{f"val_dice_{k}": v for k, v in by_source.items()}},
                       keep_epochs_below=0, plot=False)
            per_source = "".join(f", {k} {v:.4f}" for k, v in by_source.items()) if len(by_source) > 1 else ""
            print(f"{name} before training (model.init_from): validation Dice {start_dice:.4f}{per_source}",
                  flush=True)
    if averaged is not None and not resuming:
        averaged.update_parameters(trainable)  # the average starts at the starting weights
    model = DistributedDataParallel(trainable) if runtime.distributed else trainable
    last_plot = -math.inf
    run_started = time.perf_counter()
    epoch = start_epoch
    while epoch < epochs:
        started = time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        schedule = {**settings, "epochs": epochs}
        lr = learning_rate(schedule, epoch, 0, len(train_loader))  # logged: the epoch's first rate
        model.train()
        losses = []
        progress = Progress(f"{name} epoch {epoch + 1}/{epochs}", len(train_loader), "batch",
                            quiet=not runtime.is_main, prefix="vps-train")
        for step, batch in enumerate(train_loader):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(schedule, epoch, step, len(train_loader))
            if augment is not None:
                batch = augment(batch)
            with runtime.autocast():
                loss = dice_bce_loss(forward(model, batch), batch["mask"].to(runtime.device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if averaged is not None:
                averaged.update_parameters(trainable)
            losses.append(loss.item())
            progress.update(1, f"loss {loss.item():.4f}")
        progress.close()
        train_loss = runtime.mean(float(np.mean(losses)))
        val_loss, val_dice, by_source = (evaluate(scored, validate, val_loader, runtime) if val_loader
                                         else (float("nan"), -1.0, {}))
        # Fit once two epochs have run (the first is slower: decoding, warm-up), or before the first epoch whose
        # learning rate depends on the epoch count.
        if budget and fitted_epochs is None and (epoch + 1 - start_epoch >= 2
                                                 or learning_rate_depends_on_epochs(settings, epoch + 1)):
            pace = runtime.mean(time.perf_counter() - started)
            left = float(budget) * 60 - runtime.mean(time.perf_counter() - run_started)
            fitted_epochs = epochs = max(epoch + 1, min(epochs, epoch + 1 + int(left / pace)))
            if runtime.is_main:
                print(f"{name}: {epochs} epochs fit in train_{name}.max_minutes={float(budget):g} at "
                      f"{pace:.1f} s per epoch", flush=True)
        if runtime.is_main:
            score = val_dice if val_loader else float(epoch)  # no validation set: the last epoch is kept
            if score > best["dice"]:
                best = {"dice": score, "epoch": epoch}
                on_best(scored)
            torch_state = {"module": trainable.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                           "best": best, "torch_rng": torch.get_rng_state(), "fitted_epochs": fitted_epochs}
            if averaged is not None:
                torch_state["averaged"] = averaged.state_dict()
            temporary = state_path.with_name(state_path.name + ".partial")
            torch.save(torch_state, temporary)
            temporary.replace(state_path)
            seconds = time.perf_counter() - started
            # Drawing the plot takes about 0.3 s: on a GPU, where an epoch takes seconds, at most every 30 s.
            plot = epoch == epochs - 1 or time.perf_counter() - last_plot > PLOT_INTERVAL_SECONDS
            log.append({"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "val_loss": val_loss,
                        "val_dice": val_dice, "seconds": seconds,
                        **{f"val_dice_{k}": v for k, v in by_source.items()}}, keep_epochs_below=epoch + 1, plot=plot)
            last_plot = time.perf_counter() if plot else last_plot
            per_source = "".join(f", {k} {v:.4f}" for k, v in by_source.items()) if len(by_source) > 1 else ""
            print(f"{name} epoch {epoch + 1}/{epochs}: lr {lr:.2e}, train loss {train_loss:.4f}, validation loss "
                  f"{val_loss:.4f}, validation Dice {val_dice:.4f}{per_source}, {seconds:.1f} s", flush=True)
        runtime.barrier()
        epoch += 1
    return best


@torch.no_grad()
def evaluate(trainable: nn.Module, forward, loader: DataLoader, runtime: Runtime):
    """Validation: (mean loss, selection score, {source: mean per-frame Dice at threshold 0.5}).

    The selection score is the mean over sources, so each source weighs the same whatever its size. On a
    polyp-free input the Dice is 1 for an empty prediction and 0 otherwise, i.e. 1 - false-positive rate.
    """
    trainable.eval()
    losses, dices, sources = [], [], []
    progress = Progress("validation", len(loader), "batch", quiet=not runtime.is_main, prefix="vps-train")
    for batch in loader:
        with runtime.autocast():
            logits = forward(trainable, batch)
        mask = batch["mask"].to(runtime.device)
        losses.append(dice_bce_loss(logits, mask).item() * len(mask))
        dices.append(binary_dice(logits, mask).cpu())
        sources.append(torch.as_tensor(batch["source"]))
        progress.update(1)
    progress.close()
    dices, sources = torch.cat(dices), torch.cat(sources)
    names = loader.dataset.sources
    by_source = {names[i]: dices[sources == i].mean().item() for i in range(len(names)) if (sources == i).any()}
    return sum(losses) / len(dices), float(np.mean(list(by_source.values()))), by_source


def dataset_image_size(sam, generator_input_size: Optional[int] = None) -> int:
    """Side of the square images a dataset keeps: the larger of SAM's input and g's, so that neither network sees an
    upsampled image (SAM resizes down to its own input, as at inference)."""
    return max(int(sam.image_size), int(generator_input_size or 0))


def cached_datasets(config: Dict[str, Any], train_samples, val_samples, sam, sam_backend: str, sam_checkpoint,
                    photometric, geometric, runtime: Runtime, image_size: Optional[int] = None):
    """(training set, validation set or None) whose items carry SAM's embedding when ``cache.enabled`` (the
    validation set's alone with ``cache.validation``: its images are never augmented, so its embeddings are the same
    every epoch); the missing embeddings are computed first (sharded between distributed processes). Shared by every
    stage that runs SAM.
    ``image_size``: the side of the images the items carry (default SAM's input; ``dataset_image_size``)."""
    cache_config = config.get("cache", {})
    image_size = image_size or sam.image_size
    mask_size = int(config["data"].get("mask_size", 256))
    cache, views, derived = None, ["identity"], []
    caches_training = bool(cache_config.get("enabled", False))
    if caches_training or cache_config.get("validation", False):
        cache = EmbeddingCache(Path(cache_config["dir"]).expanduser(), sam_cache_id(sam_backend, sam_checkpoint))
    if caches_training:
        views = list(cache_config.get("views", ["identity"]))
        derived = list(cache_config.get("derived_views") or [])
    train_cache = cache if caches_training else None
    train_set = SegmentationDataset(train_samples, image_size, mask_size, train_cache, views, photometric,
                                    None if train_cache else geometric, derived_views=derived)
    val_set = SegmentationDataset(val_samples, image_size, mask_size, cache) if val_samples else None
    if cache is not None:
        shard = (runtime.rank, runtime.world_size)
        todo = [(dataset, missing_embeddings(dataset, dataset.cached_views, shard))
                for dataset in (train_set, val_set) if dataset is not None and dataset.cache is not None]
        if runtime.mean(float(sum(len(missing) for _, missing in todo))) > 0:
            encode = frozen_encoder(sam, config.get("runtime", {}).get("encoder_backend", "auto"), runtime)
            with runtime.autocast():
                for dataset, missing in todo:
                    fill_cache(dataset, encode, missing, runtime.device, batch_size=CACHE_FILL_BATCH,
                               progress=runtime.is_main)
        runtime.barrier()
    return train_set, val_set


def frozen_encoder(sam, backend: str, runtime: Runtime, batch: int = CACHE_FILL_BATCH):
    """SAM's frozen image encoder as training runs it, by ``runtime.encoder_backend`` (auto: OpenVINO on a CPU where
    it is installed, about 4x torch there; docs/training.md): it fills the embedding cache, or, with the cache off,
    encodes every batch. An exported backend is compiled for ``batch`` images (smaller batches are padded). The main
    process builds it first, so that the others find its export and compiled blobs cached instead of writing them at
    the same time."""
    def build():
        return image_encoder(sam, runtime.device, backend, runtime.precision, batch, option="runtime.encoder_backend")

    encode = build() if runtime.is_main else None
    runtime.barrier()
    return encode if encode is not None else build()


def split_images(config: Dict[str, Any]):
    """(training samples, validation samples) of a config's whole images: the seeded split by clip or still."""
    data_config = config["data"]
    return split_sources(data_config["root"], data_config.get("val_clips"), float(data_config.get("val_fraction", 0.2)),
                         int(data_config.get("split_seed", 0)), class_names(config))


def split_samples(config: Dict[str, Any]):
    """(training samples, validation samples, validation groups) of a config: ``split_images``, then
    ``data.random_crop`` crops or ``data.negatives`` polyp-free crops. The same for every stage and script."""
    data_config = config["data"]
    split_seed = int(data_config.get("split_seed", 0))
    train_samples, val_samples = split_images(config)
    val_groups = sorted({s.group for s in val_samples})
    crop = data_config.get("random_crop") or {}
    if crop:
        train_samples, val_samples = (random_crops(part, int(crop["size"]), int(crop["per_image"]), split_seed)
                                      for part in (train_samples, val_samples))
    negatives = data_config.get("negatives") or {}
    if negatives:
        min_side = float(negatives.get("min_side", 0.3))
        train_samples += polyp_free_crops(train_samples, float(negatives.get("train_fraction", 0.0)), min_side,
                                          split_seed)
        val_samples += polyp_free_crops(val_samples, float(negatives.get("val_fraction", 0.0)), min_side, split_seed)
    return train_samples, val_samples, val_groups


def train(config: Dict[str, Any], out_dir: str | Path, stages=("g", "h"), resume: bool = False,
          initial: Optional[Dict[str, Any]] = None) -> Path:
    """Run the configured stages (``vps.config.training_stages``: g and h for AutoSAM, ``head`` for a prompt-free
    head); returns the path of the trained model (``<out_dir>/model.pt``).

    ``initial``: the weights of ``model.init_from`` when the caller has read them already
    (``vps.modeling.build.initial_weights``); otherwise they are read here."""
    out_dir = Path(out_dir)
    runtime = setup_runtime(config.get("runtime", {}))
    seed_everything(int(config.get("runtime", {}).get("seed", 0)) + runtime.rank)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    data_config, model_config = config["data"], config["model"]
    split_seed = int(data_config.get("split_seed", 0))
    classes = class_names(config)
    crop = data_config.get("random_crop") or {}
    negatives = data_config.get("negatives") or {}
    train_samples, val_samples, val_groups = split_samples(config)
    if runtime.is_main:
        for part, part_samples in (("training", train_samples), ("validation", val_samples)):
            counts = {}
            for sample in part_samples:
                counts[sample.source] = counts.get(sample.source, 0) + 1
            print(f"{part}: {len(part_samples)} {'crops' if crop else 'images'} "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})", flush=True)
        shown = val_groups if len(val_groups) <= 12 else val_groups[:12] + [f"... ({len(val_groups)} in all)"]
        print(f"validation clips: {', '.join(shown) if shown else 'none'}", flush=True)

    sam_config = dict(model_config["sam"])
    sam_backend, sam_checkpoint = sam_config.pop("backend"), sam_config.pop("checkpoint", None)
    sam = build_sam(sam_backend, sam_checkpoint, **sam_config).to(runtime.device)
    mask_size = int(data_config.get("mask_size", 256))
    workers = int(config.get("runtime", {}).get("num_workers", 0))
    seed = int(config.get("runtime", {}).get("seed", 0))
    augment = config.get("augment", {})
    photometric, geometric = build_photometric(augment), build_geometric(augment)
    on_device = augments_on_device(config.get("runtime", {}).get("augment_on", "auto"), runtime.device, workers)
    cache_enabled = bool(config.get("cache", {}).get("enabled", False))
    encoder_backend = config.get("runtime", {}).get("encoder_backend", "auto")
    # In the workers, the datasets augment; on the device, they hand over plain items and the batch is augmented.
    loader_photometric, loader_geometric = (None, None) if on_device else (photometric, geometric)

    def device_augment(with_geometry: bool):
        if not on_device:
            return None
        transform = BatchAugment(geometric if with_geometry else None, photometric)

        def augment_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            images = batch["image"].to(runtime.device, non_blocking=True)
            masks = batch["mask"].to(runtime.device, non_blocking=True)
            images, masks = transform(images, masks)
            return {**batch, "image": images, "mask": masks}
        return augment_batch
    model_path = out_dir / MODEL_FILE
    init_from = model_config.get("init_from")
    provenance = dict(trained_on=[str(r) for r in as_root_list(data_config["root"])], val_clips=val_groups,
                      split_seed=split_seed, negatives=negatives or None, random_crop=crop or None,
                      init_from=init_from)
    if initial is None:
        initial = initial_weights(init_from, sam_backend, model_config["prompt_generator"]) if init_from else {}

    def loaders(settings: Dict[str, Any], train_set, val_set):
        return (_loader(train_set, int(settings["batch_size"]), runtime, True, workers, seed),
                _loader(val_set, int(settings["batch_size"]), runtime, False, workers, seed) if val_set else None)

    def uncached_encoder(settings: Dict[str, Any]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """With the cache off, SAM's encoder for every batch of a stage (``runtime.encoder_backend``, compiled for the
        stage's batch size); None with the cache on."""
        if cache_enabled:
            return None
        return frozen_encoder(sam, encoder_backend, runtime, batch=int(settings["batch_size"]))

    def embeddings_of(batch: Dict[str, torch.Tensor],
                      encode: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """SAM's embeddings of the batch: from the cache (stored float16, given to SAM's decoder as float32) or
        computed here by ``encode`` (``uncached_encoder``).

        Not the autocast dtype: SAM's decoder adds the dense prompt to the embedding and keeps that sum, its
        residual stream, in the embedding's dtype (autocast only lowers the matrix products). In bfloat16 the
        prompt's gradient is coarse enough to slow training: the embedding prompt head reached a training loss
        of 0.66 after two epochs from bfloat16 embeddings against 0.46 from float32 (MODEL_CARD.md)."""
        if "embedding" in batch:
            return batch["embedding"].to(runtime.device, torch.float32, non_blocking=True)
        return encode(batch["image"].to(runtime.device, non_blocking=True))

    @functools.lru_cache(maxsize=None)
    def autosam_datasets():
        """The datasets of stages g and embedding_prompt (the same images at the same size), built and their cache
        checked once, when the first of them runs."""
        return cached_datasets(config, train_samples, val_samples, sam, sam_backend, sam_checkpoint,
                               loader_photometric, loader_geometric, runtime,
                               dataset_image_size(sam, model_config["prompt_generator"].get("input_size")))

    if "head" in stages:
        settings_head = head_settings(model_config["head"])
        train_set, val_set = cached_datasets(config, train_samples, val_samples, sam, sam_backend, sam_checkpoint,
                                              loader_photometric, loader_geometric, runtime)
        head = build_head(settings_head, sam, num_classes=max(1, len(classes))).to(runtime.device)
        metadata = checkpoint_metadata(None, sam_backend, head=settings_head, classes=classes or None, **provenance)
        settings = config["train_head"]
        encode_head = uncached_encoder(settings)
        run_stage("head", head, lambda module, batch: module(embeddings_of(batch, encode_head)),
                  *loaders(settings, train_set, val_set), settings, runtime, out_dir,
                  lambda module: save_checkpoint(model_path, metadata, None, head=module), resume,
                  augment=device_augment(with_geometry=not cache_enabled))
        runtime.barrier()

    if "g" in stages:
        generator_config = model_config["prompt_generator"]
        train_set, val_set = autosam_datasets()
        generator = build_prompt_generator(generator_config, embedding_size=sam.embedding_shape[-1]).to(runtime.device)
        if "prompt_generator" in initial:
            load_weights(generator, initial["prompt_generator"], "prompt generator", f"model.init_from {init_from}")
        metadata = checkpoint_metadata(generator_config, sam_backend, None,
                                       box_refinement=bool(model_config.get("box_refinement", False)),
                                       flip_tta=bool(model_config.get("flip_tta", False)), **provenance)

        settings = config["train_g"]
        encode_g = uncached_encoder(settings)

        def forward_g(g: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
            images = batch["image"].to(runtime.device, non_blocking=True)
            return sam.decode(embeddings_of(batch, encode_g), g(images))

        run_stage("g", generator, forward_g, *loaders(settings, train_set, val_set),
                  settings, runtime, out_dir, lambda module: save_checkpoint(model_path, metadata, module), resume,
                  starts_trained="prompt_generator" in initial, augment=device_augment(with_geometry=not cache_enabled))
        runtime.barrier()

    if "embedding_prompt" in stages:
        train_embedding_prompt(config, model_path, sam, initial, provenance, runtime, resume, autosam_datasets(),
                               loaders, embeddings_of, uncached_encoder,
                               device_augment(with_geometry=not cache_enabled))
        runtime.barrier()

    if "h" in stages:
        payload = read_checkpoint(model_path)
        generator = build_prompt_generator(payload["meta"]["prompt_generator"], pretrained_backbone=False)
        load_weights(generator, payload["prompt_generator"], "prompt generator", str(model_path))
        generator.to(runtime.device).eval().requires_grad_(False)
        embedding_prompt = None
        if "embedding_prompt" in payload:  # kept as it is: h decodes g's prompt alone
            embedding_prompt = build_embedding_prompt(payload["meta"]["embedding_prompt"], sam.embedding_shape[0])
            load_weights(embedding_prompt, payload["embedding_prompt"], "embedding prompt head", str(model_path))
        surrogate_config = model_config.get("surrogate", {})
        surrogate = build_surrogate(surrogate_config).to(runtime.device)
        if "surrogate" in initial:
            load_weights(surrogate, initial["surrogate"], "surrogate decoder", f"model.init_from {init_from}")
        metadata = {**payload["meta"], "surrogate": surrogate_config}
        image_size = dataset_image_size(sam, generator.input_size)
        train_set = SegmentationDataset(train_samples, image_size, mask_size, None, ["identity"], loader_photometric,
                                        loader_geometric)
        val_set = SegmentationDataset(val_samples, image_size, mask_size) if val_samples else None

        def forward_h(h: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                prompt = generator(batch["image"].to(runtime.device, non_blocking=True))
            return h(prompt)

        settings = config["train_h"]
        run_stage("h", surrogate, forward_h, *loaders(settings, train_set, val_set),
                  settings, runtime, out_dir,
                  lambda module: save_checkpoint(model_path, metadata, generator, module,
                                                 embedding_prompt=embedding_prompt),
                  resume, starts_trained="surrogate" in initial, augment=device_augment(with_geometry=True))
    return model_path


def train_embedding_prompt(config: Dict[str, Any], model_path: Path, sam, initial: Dict[str, Any],
                           provenance: Dict[str, Any], runtime: Runtime, resume: bool, datasets, loaders,
                           embeddings_of, uncached_encoder, augment) -> None:
    """Stage ``embedding_prompt``: AutoSAM's second prompt generator (``model.embedding_prompt``), trained alone
    through SAM's frozen decoder on SAM's embeddings (from the cache: no image encoder), chosen on the validation
    Dice of the model it joins (g's prompt and its own mixed, with the run's flip TTA, no box refinement); g alone
    is scored first, and if no epoch's mix beats it, ``model_path`` ends without the head.

    g (and h) come from ``model_path`` (stage g of this run), else from ``model.init_from``, whose header then
    stays the model's (with this run's data as ``embedding_prompt_trained_on``); ``model_path`` is rewritten with
    them and the head on every new best. The arguments after ``resume`` are ``train``'s helpers."""
    model_config = config["model"]
    settings_prompt = embedding_prompt_settings(model_config["embedding_prompt"])
    if model_path.is_file():
        base, source = read_checkpoint(model_path), str(model_path)
    elif "prompt_generator" in initial:  # the header of model.init_from: how its g (and h) were trained
        meta = {**initial["meta"], "box_refinement": bool(model_config.get("box_refinement", False)),
                "flip_tta": bool(model_config.get("flip_tta", False)),
                "embedding_prompt_trained_on": provenance["trained_on"]}
        base, source = {**initial, "meta": meta}, f"model.init_from {model_config.get('init_from')}"
    else:
        raise ConfigError("stage embedding_prompt mixes its prompt with a trained g: run stage g first "
                          "(--stage all) or set model.init_from")
    meta = base["meta"]
    generator = build_prompt_generator(meta["prompt_generator"], embedding_size=sam.embedding_shape[-1],
                                       pretrained_backbone=False)
    load_weights(generator, base["prompt_generator"], "prompt generator", source)
    generator.to(runtime.device).eval().requires_grad_(False)
    surrogate = None
    if "surrogate" in base:
        surrogate = build_surrogate(meta.get("surrogate"))
        load_weights(surrogate, base["surrogate"], "surrogate decoder", source)
    head = build_embedding_prompt(settings_prompt, sam.embedding_shape[0])
    if "embedding_prompt" in initial:
        load_weights(head, initial["embedding_prompt"], "embedding prompt head",
                     f"model.init_from {model_config.get('init_from')}")
    head.to(runtime.device)
    metadata = with_embedding_prompt(meta, settings_prompt)
    settings = config["train_embedding_prompt"]
    encode = uncached_encoder(settings)

    def forward(module: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        embeddings = embeddings_of(batch, encode)
        return sam.decode(embeddings, module(embeddings))

    def first_pass(batch: Dict[str, torch.Tensor], module: Optional[nn.Module]) -> torch.Tensor:
        """AutoSAM's first pass with g, the run's flip TTA and ``module`` as the embedding prompt head (or none)."""
        model = AutoSAM(sam, generator, flip_tta=bool(meta.get("flip_tta", False)), embedding_prompt=module,
                        embedding_prompt_weight=float(settings_prompt["weight"]))
        images = batch["image"].to(runtime.device, non_blocking=True)
        return model.first_pass(images, embeddings_of(batch, encode))[0]

    def mixed(module: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return first_pass(batch, module)

    def alone(module: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return first_pass(batch, None)

    train_loader, val_loader = loaders(settings, *datasets)
    alone_dice = evaluate(head, alone, val_loader, runtime)[1] if val_loader is not None else -1.0
    if runtime.is_main and val_loader is not None:
        print(f"embedding_prompt: g alone scores validation Dice {alone_dice:.4f}; the head is kept only if the mix "
              "scores higher", flush=True)
    best = run_stage("embedding_prompt", head, forward, train_loader, val_loader, settings, runtime,
                     model_path.parent,
                     lambda module: save_checkpoint(model_path, metadata, generator, surrogate,
                                                    embedding_prompt=module),
                     resume, starts_trained="embedding_prompt" in initial, augment=augment, validate=mixed)
    if runtime.is_main and best["dice"] <= alone_dice:
        save_checkpoint(model_path, without_embedding_prompt(meta), generator, surrogate)
        print(f"embedding_prompt: no epoch's mix beat g alone ({best['dice']:.4f} <= {alone_dice:.4f}); model.pt "
              "keeps g without the head", flush=True)
