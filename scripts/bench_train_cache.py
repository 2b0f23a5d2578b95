"""Seconds per training epoch of g, measured side by side in one run:

- without the SAM embedding cache (every step runs the frozen image encoder), fp32;
- with the cache, fp32 (the step before the speed work);
- with the cache, bf16 autocast for g and SAM's decoder (the trainer's default on CPUs with native bf16).

All three time the same training steps (batch size 10, the paper's) on the same images, through the
trainer's own dataset, loss and optimiser. Per-epoch figures are per-image times times the epoch size
(1300: the default recipe's CVC + Kvasir training images and polyp-free crops).

The one-off cost of filling the cache (one pass of SAM's encoder per image and view) is timed with each
encoder the trainer can use (``runtime.encoder_backend``), on the same images in one run: torch eager
fp32 and bf16 autocast, and what ``auto`` picks on this machine (OpenVINO where installed).

``uncached``: training steps without the cache (the exact recipe: the whole augmentation reaches SAM), bf16,
with the frozen encoder run by torch eager against what ``runtime.encoder_backend: auto`` picks, side by side.

    python scripts/bench_train_cache.py [--images 20] [--epoch-size 1300] [--only steps fill uncached]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

import vps
from vps.backends import auto_candidates, image_encoder
from vps.hardware import cpu_has_native_bf16, cpu_name
from vps.inference import autocast_dtype, resolve_precision
from vps.modeling import build_prompt_generator, build_sam
from vps.train.cache import EmbeddingCache
from vps.train.data import discover_samples
from vps.train.dataset import SegmentationDataset, fill_cache, missing_embeddings
from vps.train.trainer import CACHE_FILL_BATCH, dice_bce_loss

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cvc-clinicdb-video"


def time_steps(dataset, sam, generator, batch_size: int, dtype: Optional[torch.dtype] = None,
               encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
    """Seconds for one pass over ``dataset`` in training steps (Adam on g, BCE + Dice through SAM's decoder),
    under autocast to ``dtype`` (None: fp32); an uncached dataset's embeddings come from ``encode`` (default
    ``sam.encode``)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-4, weight_decay=1e-5)
    generator.train()
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    started = time.perf_counter()
    for batch in loader:
        with autocast:
            if "embedding" in batch:
                embeddings = batch["embedding"].float()  # as the trainer gives them to SAM's decoder
            else:
                embeddings = (encode or sam.encode)(batch["image"])
            loss = dice_bce_loss(sam.decode(embeddings, generator(batch["image"])), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def fill_seconds(samples, sam, encode, dtype: Optional[torch.dtype] = None) -> float:
    """Seconds to fill an empty cache with the identity view of ``samples`` (the trainer's batch), with ``encode``."""
    with tempfile.TemporaryDirectory() as cache_dir:
        dataset = SegmentationDataset(samples, sam.image_size, 256, EmbeddingCache(cache_dir, "litemedsam"),
                                      ["identity"])
        todo = missing_embeddings(dataset, ["identity"])
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        started = time.perf_counter()
        with autocast:
            fill_cache(dataset, encode, todo, torch.device("cpu"), batch_size=CACHE_FILL_BATCH, progress=False)
        return time.perf_counter() - started


def auto_encoder(sam, batch: int) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str, str]:
    """(encoder, backend name, precision) that ``runtime.encoder_backend: auto`` builds on this CPU for ``batch``
    images, in the trainer's default precision."""
    precision = resolve_precision("auto", torch.device("cpu"))
    encode = image_encoder(sam, torch.device("cpu"), "auto", precision, batch)
    name = "torch eager" if encode == sam.encode else auto_candidates(torch.device("cpu"))[0]
    return encode, name, precision


def bench_fill(samples, sam) -> None:
    started = time.perf_counter()
    auto, auto_name, precision = auto_encoder(sam, CACHE_FILL_BATCH)
    start_up = time.perf_counter() - started
    fill_seconds(samples[:CACHE_FILL_BATCH], sam, auto)  # warm-up
    auto_label = f"auto ({auto_name}, {precision})"
    seconds = {"eager fp32": fill_seconds(samples, sam, sam.encode),
               "eager bf16": fill_seconds(samples, sam, sam.encode, torch.bfloat16),
               auto_label: fill_seconds(samples, sam, auto)}
    print(f"cache fill, {len(samples)} images, batch {CACHE_FILL_BATCH} (once per image and view):")
    for name, value in seconds.items():
        print(f"{name:>36}: {value / len(samples):.3f} s/image")
    print(f"auto's start-up (export and compile, or read from the cache): {start_up:.1f} s")
    images = torch.stack([SegmentationDataset(samples, sam.image_size, 256).load(i)[1]
                          for i in range(min(CACHE_FILL_BATCH, len(samples)))])
    with torch.no_grad():
        reference = sam.encode(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager_bf16 = sam.encode(images).float()
        scale = reference.abs().mean()
        print(f"embeddings vs eager fp32, mean |difference| / mean |embedding|: eager bf16 "
              f"{(eager_bf16 - reference).abs().mean() / scale:.4f}, auto {(auto(images) - reference).abs().mean() / scale:.4f}")
    fastest_torch = min(seconds["eager fp32"], seconds["eager bf16"])
    print(f"speed-up of the cache fill, auto vs the faster torch eager: {fastest_torch / seconds[auto_label]:.2f}x")


def bench_uncached(samples, sam, generator, batch_size: int, epoch_size: int) -> None:
    auto, auto_name, precision = auto_encoder(sam, batch_size)
    dtype = autocast_dtype(precision, torch.device("cpu"))
    dataset = SegmentationDataset(samples, sam.image_size, 256)
    time_steps(dataset, sam, generator, batch_size, dtype, auto)  # warm-up of both encoders
    time_steps(dataset, sam, generator, batch_size, dtype)
    seconds = {f"eager encoder, {precision}": time_steps(dataset, sam, generator, batch_size, dtype),
               f"auto encoder ({auto_name}), {precision}": time_steps(dataset, sam, generator, batch_size, dtype, auto)}
    print(f"training steps without the cache, batch {batch_size}:")
    for name, value in seconds.items():
        print(f"{name:>36}: {value / len(samples):.3f} s/image -> {value / len(samples) * epoch_size:.0f} s per epoch "
              f"of {epoch_size}")
    eager, chosen = seconds.values()
    print(f"speed-up of an uncached epoch, auto encoder vs eager: {eager / chosen:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="image/mask data (default: the CVC clips)")
    parser.add_argument("--images", type=int, default=20, help="images timed each way")
    parser.add_argument("--epoch-size", type=int, default=1300)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--only", nargs="+", choices=("steps", "fill", "uncached"),
                        default=["steps", "fill", "uncached"],
                        help="training steps with and without the cache (steps), the cache fill by encoder (fill), "
                             "steps without the cache by encoder (uncached)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"bench_train_cache: no data at {args.data} (pass --data with images and masks)")
    samples = discover_samples(args.data)[: args.images]
    sam = build_sam("litemedsam")
    generator = build_prompt_generator()
    print(f"CPU: {cpu_name()} | nproc {os.cpu_count()} | torch {torch.__version__} | threads {torch.get_num_threads()} "
          f"| vps {vps.__version__} | {len(samples)} images, batch {args.batch_size} "
          f"| native bf16: {cpu_has_native_bf16()}")
    if "fill" in args.only:
        bench_fill(samples, sam)
    if "uncached" in args.only:
        bench_uncached(samples, sam, generator, args.batch_size, args.epoch_size)
    if "steps" not in args.only:
        return
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = EmbeddingCache(cache_dir, "litemedsam")
        cached = SegmentationDataset(samples, sam.image_size, 256, cache, ["identity"])
        fill_cache(cached, sam.encode, missing_embeddings(cached, ["identity"]), torch.device("cpu"), progress=False)
        uncached = SegmentationDataset(samples, sam.image_size, 256)
        time_steps(cached, sam, generator, args.batch_size)  # warm-up, both precisions
        time_steps(cached, sam, generator, args.batch_size, torch.bfloat16)
        with_cache = time_steps(cached, sam, generator, args.batch_size)
        with_cache_bf16 = time_steps(cached, sam, generator, args.batch_size, torch.bfloat16)
        without_cache = time_steps(uncached, sam, generator, args.batch_size)
    per_image = {"without cache, fp32": without_cache, "cache, fp32 (before)": with_cache,
                 "cache, bf16 (after)": with_cache_bf16}
    for name, seconds in per_image.items():
        seconds /= len(samples)
        print(f"{name:>22}: {seconds:.3f} s/image -> {seconds * args.epoch_size:.0f} s per epoch of {args.epoch_size}")
    print(f"speed-up with the cache (fp32): {without_cache / with_cache:.2f}x (goal: at least 5x)")
    print(f"speed-up of the epoch, bf16 after vs fp32 before: {with_cache / with_cache_bf16:.2f}x")


if __name__ == "__main__":
    main()
