"""Training AutoSAM's prompt generator g (stage 1) and the surrogate decoder h (stage 2)."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from vps.config import save_config
from vps.inference import autocast_dtype, resolve_device, resolve_precision
from vps.modeling import build_prompt_generator, build_sam, build_surrogate, checkpoint_metadata, save_checkpoint
from vps.modeling.build import read_checkpoint
from vps.train.augment import build_geometric, build_photometric
from vps.train.cache import EmbeddingCache, sam_cache_id
from vps.train.data import check_samples, discover_samples, split_by_group
from vps.train.dataset import SegmentationDataset, fill_cache

MODEL_FILE = "model.pt"


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Unweighted BCE on logits + soft Dice on probabilities; logits and target B x 1 x H x W."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probabilities = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    dice = (2 * (probabilities * target).sum(1) + eps) / (probabilities.sum(1) + target.sum(1) + eps)
    return bce + (1 - dice).mean()


def binary_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of (sigmoid > 0.5) against the target: B values; two empty masks score 1."""
    prediction = (logits.float() > 0).flatten(1).float()
    target = target.flatten(1)
    overlap = (prediction * target).sum(1)
    total = prediction.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1e-9), torch.ones_like(total))


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochLog:
    """Per-epoch CSV (epoch, train_loss, val_loss, val_dice, seconds) and a PNG plot beside it."""

    FIELDS = ["epoch", "train_loss", "val_loss", "val_dice", "seconds"]

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> List[Dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open() as handle:
            return list(csv.DictReader(handle))

    def append(self, row: Dict[str, float], keep_epochs_below: int) -> None:
        """Append a row, first dropping rows of epochs >= keep_epochs_below (left by a killed run)."""
        rows = [r for r in self.rows() if int(r["epoch"]) < keep_epochs_below] + [
            {k: f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in self.FIELDS}]
        temporary = self.path.with_name(self.path.name + ".partial")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        temporary.replace(self.path)
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
        dice_axes.plot(epochs, [float(r["val_dice"]) for r in rows], color="tab:green")
        dice_axes.set(xlabel="epoch", ylabel="validation Dice @0.5", ylim=(0, 1))
        figure.suptitle(self.path.stem)
        figure.tight_layout()
        figure.savefig(self.path.with_suffix(".png"), dpi=100)
        plt.close(figure)


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
    on_best: Callable[[], None],
    resume: bool,
) -> Dict[str, Any]:
    """Train ``trainable`` with Adam on BCE + Dice; checkpoint every epoch; call ``on_best`` on a new best.

    The state file ``<name>_last.pt`` (weights, optimiser, epoch, best score, RNG) is rewritten
    atomically after every epoch, so a run killed at any moment resumes losing at most one epoch.
    """
    optimizer = torch.optim.Adam(trainable.parameters(), lr=float(settings["lr"]),
                                 weight_decay=float(settings["weight_decay"]))
    scaler = torch.amp.GradScaler(enabled=runtime.precision == "fp16")
    state_path = out_dir / f"{name}_last.pt"
    log = EpochLog(out_dir / f"log_{name}.csv")
    start_epoch, best = 0, {"dice": -1.0, "epoch": -1}
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        trainable.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        torch.set_rng_state(state["torch_rng"])
        if runtime.is_main:
            print(f"resuming stage {name} at epoch {start_epoch} (best validation Dice {best['dice']:.4f})")
    model = DistributedDataParallel(trainable) if runtime.distributed else trainable
    epochs = int(settings["epochs"])
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        losses = []
        bar = tqdm(train_loader, desc=f"{name} epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=not runtime.is_main)
        for batch in bar:
            with runtime.autocast():
                loss = dice_bce_loss(forward(model, batch), batch["mask"].to(runtime.device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_loss = runtime.mean(float(np.mean(losses)))
        val_loss, val_dice = evaluate(trainable, forward, val_loader, runtime) if val_loader else (float("nan"), -1.0)
        if runtime.is_main:
            score = val_dice if val_loader else float(epoch)  # no validation set: the last epoch is kept
            if score > best["dice"]:
                best = {"dice": score, "epoch": epoch}
                on_best()
            torch_state = {"module": trainable.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                           "best": best, "torch_rng": torch.get_rng_state()}
            temporary = state_path.with_name(state_path.name + ".partial")
            torch.save(torch_state, temporary)
            temporary.replace(state_path)
            seconds = time.perf_counter() - started
            log.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_dice": val_dice,
                        "seconds": seconds}, keep_epochs_below=epoch + 1)
            print(f"{name} epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}, "
                  f"validation Dice {val_dice:.4f}, {seconds:.1f} s", flush=True)
        runtime.barrier()
    return best


@torch.no_grad()
def evaluate(trainable: nn.Module, forward, loader: DataLoader, runtime: Runtime):
    """Mean loss and mean per-frame Dice (threshold 0.5) over the validation loader."""
    trainable.eval()
    losses, dices = [], []
    for batch in loader:
        with runtime.autocast():
            logits = forward(trainable, batch)
        mask = batch["mask"].to(runtime.device)
        losses.append(dice_bce_loss(logits, mask).item() * len(mask))
        dices.append(binary_dice(logits, mask).cpu())
    count = sum(len(d) for d in dices)
    return sum(losses) / count, torch.cat(dices).mean().item()


def train(config: Dict[str, Any], out_dir: str | Path, stages=("g", "h"), resume: bool = False) -> Path:
    """Run the configured stages; returns the path of the trained model (``<out_dir>/model.pt``)."""
    out_dir = Path(out_dir)
    runtime = setup_runtime(config.get("runtime", {}))
    seed_everything(int(config.get("runtime", {}).get("seed", 0)) + runtime.rank)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    data_config, model_config = config["data"], config["model"]
    samples = discover_samples(data_config["root"])
    check_samples(samples)
    train_samples, val_samples = split_by_group(samples, data_config.get("val_clips"),
                                                float(data_config.get("val_fraction", 0.2)),
                                                int(data_config.get("split_seed", 0)))
    if runtime.is_main:
        groups = sorted({s.group for s in val_samples})
        print(f"{len(train_samples)} training and {len(val_samples)} validation images; "
              f"validation clips: {', '.join(groups) if groups else 'none'}", flush=True)

    sam_config = dict(model_config["sam"])
    sam_backend, sam_checkpoint = sam_config.pop("backend"), sam_config.pop("checkpoint", None)
    sam = build_sam(sam_backend, sam_checkpoint, **sam_config).to(runtime.device)
    image_size, mask_size = sam.image_size, int(data_config.get("mask_size", 256))
    workers = int(config.get("runtime", {}).get("num_workers", 0))
    seed = int(config.get("runtime", {}).get("seed", 0))
    augment = config.get("augment", {})
    photometric, geometric = build_photometric(augment), build_geometric(augment)
    generator_config = model_config["prompt_generator"]
    model_path = out_dir / MODEL_FILE

    if "g" in stages:
        cache_config = config.get("cache", {})
        cache = None
        views = ["identity"]
        if cache_config.get("enabled", False):
            cache = EmbeddingCache(cache_config["dir"], sam_cache_id(sam_backend, sam_checkpoint))
            views = list(cache_config.get("views", ["identity"]))
        train_set = SegmentationDataset(train_samples, image_size, mask_size, cache, views, photometric,
                                        None if cache else geometric)
        val_set = SegmentationDataset(val_samples, image_size, mask_size, cache) if val_samples else None
        if cache is not None:
            with runtime.autocast():
                fill_cache(train_set, sam, views, runtime.device, shard=(runtime.rank, runtime.world_size),
                           progress=runtime.is_main)
                if val_set is not None:
                    fill_cache(val_set, sam, ["identity"], runtime.device, shard=(runtime.rank, runtime.world_size),
                               progress=runtime.is_main)
            runtime.barrier()
        generator = build_prompt_generator(generator_config, embedding_size=sam.embedding_shape[-1]).to(runtime.device)
        metadata = checkpoint_metadata(generator_config, sam_backend, None, trained_on=str(data_config["root"]),
                                       val_clips=sorted({s.group for s in val_samples}))

        def forward_g(g: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
            images = batch["image"].to(runtime.device, non_blocking=True)
            if "embedding" in batch:
                embeddings = batch["embedding"].to(runtime.device, non_blocking=True).float()
            else:
                embeddings = sam.encode(images)
            return sam.decode(embeddings, g(images))

        settings = config["train_g"]
        run_stage("g", generator, forward_g,
                  _loader(train_set, int(settings["batch_size"]), runtime, True, workers, seed),
                  _loader(val_set, int(settings["batch_size"]), runtime, False, workers, seed) if val_set else None,
                  settings, runtime, out_dir, lambda: save_checkpoint(model_path, metadata, generator), resume)
        runtime.barrier()

    if "h" in stages:
        payload = read_checkpoint(model_path)
        generator = build_prompt_generator(payload["meta"]["prompt_generator"], pretrained_backbone=False)
        generator.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in payload["prompt_generator"].items()})
        generator.to(runtime.device).eval().requires_grad_(False)
        surrogate_config = model_config.get("surrogate", {})
        surrogate = build_surrogate(surrogate_config).to(runtime.device)
        metadata = {**payload["meta"], "surrogate": surrogate_config}
        train_set = SegmentationDataset(train_samples, image_size, mask_size, None, ["identity"], photometric, geometric)
        val_set = SegmentationDataset(val_samples, image_size, mask_size) if val_samples else None

        def forward_h(h: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                prompt = generator(batch["image"].to(runtime.device, non_blocking=True))
            return h(prompt)

        settings = config["train_h"]
        run_stage("h", surrogate, forward_h,
                  _loader(train_set, int(settings["batch_size"]), runtime, True, workers, seed),
                  _loader(val_set, int(settings["batch_size"]), runtime, False, workers, seed) if val_set else None,
                  settings, runtime, out_dir, lambda: save_checkpoint(model_path, metadata, generator, surrogate),
                  resume)
    return model_path
