"""Seconds per training epoch of g, measured side by side in one run:

- without the SAM embedding cache (every step runs the frozen image encoder), fp32;
- with the cache, fp32 (the step before the speed work);
- with the cache, bf16 autocast for g and SAM's decoder (the trainer's default on CPUs with native bf16).

All three time the same training steps (batch size 10, the paper's) on the same images, through the
trainer's own dataset, loss and optimiser. The one-off cost of filling the cache is reported too.
Per-epoch figures are per-image times times the epoch size (1300: the default recipe's CVC + Kvasir
training images and polyp-free crops).

    python scripts/bench_train_cache.py [--images 20] [--epoch-size 1300]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

import vps
from vps.hardware import cpu_has_native_bf16, cpu_name
from vps.modeling import build_prompt_generator, build_sam
from vps.train.cache import EmbeddingCache
from vps.train.data import discover_samples
from vps.train.dataset import SegmentationDataset, fill_cache
from vps.train.trainer import dice_bce_loss

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cvc-clinicdb-video"


def time_steps(dataset, sam, generator, batch_size: int, dtype: Optional[torch.dtype] = None) -> float:
    """Seconds for one pass over ``dataset`` in training steps (Adam on g, BCE + Dice through SAM's decoder),
    under autocast to ``dtype`` (None: fp32)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-4, weight_decay=1e-5)
    generator.train()
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    started = time.perf_counter()
    for batch in loader:
        with autocast:
            if "embedding" in batch:
                embeddings = batch["embedding"].to(dtype or torch.float32)
            else:
                embeddings = sam.encode(batch["image"])
            loss = dice_bce_loss(sam.decode(embeddings, generator(batch["image"])), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="image/mask data (default: the CVC clips)")
    parser.add_argument("--images", type=int, default=20, help="images timed each way")
    parser.add_argument("--epoch-size", type=int, default=1300)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"bench_train_cache: no data at {args.data} (pass --data with images and masks)")
    samples = discover_samples(args.data)[: args.images]
    sam = build_sam("litemedsam")
    generator = build_prompt_generator()
    print(f"CPU: {cpu_name()} | nproc {os.cpu_count()} | torch {torch.__version__} | threads {torch.get_num_threads()} "
          f"| vps {vps.__version__} | {len(samples)} images, batch {args.batch_size} "
          f"| native bf16: {cpu_has_native_bf16()}")
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = EmbeddingCache(cache_dir, "litemedsam")
        cached = SegmentationDataset(samples, sam.image_size, 256, cache, ["identity"])
        started = time.perf_counter()
        fill_cache(cached, sam, ["identity"], torch.device("cpu"), batch_size=1, progress=False)
        fill_seconds = time.perf_counter() - started
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
    print(f"cache fill (once per image and view): {fill_seconds / len(samples):.3f} s/image")
    print(f"speed-up with the cache (fp32): {without_cache / with_cache:.2f}x (goal: at least 5x)")
    print(f"speed-up of the epoch, bf16 after vs fp32 before: {with_cache / with_cache_bf16:.2f}x")


if __name__ == "__main__":
    main()
