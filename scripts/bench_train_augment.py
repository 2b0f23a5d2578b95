"""Where a training batch is augmented (``runtime.augment_on``), timed side by side in one run with the training
step it feeds; without the embedding cache, as on a GPU (SAM's encoder runs every step).

Per batch of ``--batch-size`` images, with the recipe of ``configs/train/polyp_litemedsam.yaml`` (flips,
RandomAffine(90, scale 0.75-1.25), colour jitter):

- loader: the dataset's per-sample augmentation on one CPU thread, i.e. one DataLoader worker's work (N workers
  share it N ways, when they have N free cores);
- device: ``vps.train.augment.BatchAugment`` on the batch where it lives (``--device``);
- step: one training step of g (SAM's encoder, g, SAM's decoder, BCE + Dice, Adam) in the trainer's precision.

    python scripts/bench_train_augment.py [--device auto|cpu|cuda] [--images 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vps  # noqa: F401
from bench_model import hardware_line, median_seconds  # scripts/ is on the path when a script runs
from vps.config import load_config
from vps.inference import autocast_dtype, resolve_device, resolve_precision
from vps.modeling import build_prompt_generator, build_sam
from vps.train.augment import BatchAugment, build_geometric, build_photometric
from vps.train.data import discover_samples
from vps.train.dataset import SegmentationDataset
from vps.train.trainer import dice_bce_loss

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "kvasir-seg"


def median_ms(run, device: torch.device, repeats: int) -> float:
    """Median wall time of ``run()`` in milliseconds, after one warm-up call (device work waited for)."""
    return 1000 * median_seconds(run, device, warmup=1, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="image/mask data (default: the Kvasir stills)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "train" / "polyp_litemedsam.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = load_config(args.config)
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    geometric, photometric = build_geometric(config["augment"]), build_photometric(config["augment"])
    samples = discover_samples(args.data)[:args.images]
    plain = SegmentationDataset(samples, 256, 256)
    augmented = SegmentationDataset(samples, 256, 256, photometric=photometric, geometric=geometric)
    for index in range(len(samples)):  # decoded once, as the workers keep them
        plain.load(index), augmented.load(index)
    batch = args.batch_size
    images = torch.stack([plain[i]["image"] for i in range(batch)]).to(device)
    masks = torch.stack([plain[i]["mask"] for i in range(batch)]).to(device)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs one thread
    loader_ms = median_ms(lambda: [augmented[i] for i in range(batch)], torch.device("cpu"), args.repeats)
    torch.set_num_threads(threads)
    device_augment = BatchAugment(geometric, photometric)
    device_ms = median_ms(lambda: device_augment(images, masks), device, args.repeats)

    sam = build_sam("litemedsam").to(device)
    generator = build_prompt_generator(config["model"]["prompt_generator"],
                                       embedding_size=sam.embedding_shape[-1]).to(device).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-4)
    dtype = autocast_dtype(precision, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = dice_bce_loss(sam.decode(sam.encode(images), generator(images)), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_ms = median_ms(step, device, args.repeats)
    print(f"{hardware_line(device)} | device {device} | batch {batch}, {precision}")
    rows = [("augment in a loader worker (1 CPU thread)", loader_ms), ("augment on the device (BatchAugment)", device_ms),
            ("training step of g (no cache)", step_ms)]
    for label, ms in rows:
        print(f"{label:44s} {ms:9.1f} ms/batch  {1000 * batch / ms:8.1f} images/s")
    print(f"device augmentation vs one loader worker: {loader_ms / device_ms:.2f}x; device augmentation adds "
          f"{100 * device_ms / step_ms:.0f} % to a step; loader workers needed to keep up with the step: "
          f"{loader_ms / step_ms:.1f}")


if __name__ == "__main__":
    main()
