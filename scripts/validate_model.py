"""Validation report for a trained model: AutoSAM, the light model h(g(I)) and box-prompted LiteMedSAM.

Writes 8-bit probability maps for the validation clips named in the checkpoint (or --clips) under
--out/<method>/<clip>/<frame>.png, then scores them with vps-eval (video protocol) into one table:

    python scripts/validate_model.py --checkpoint vps/weights/autosam_litemedsam_cvc.pt \
        --data ../shared/data/cvc-clinicdb-video --out runs/validation

The box reference prompts the same frozen LiteMedSAM with the ground-truth mask's bounding box (an
upper bound that needs a person in the loop); AutoSAM needs no prompt.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import vps  # noqa: F401
from vps.modeling import load_model_from_checkpoint, read_checkpoint
from vps.modeling.autosam import upsample_logits
from vps.train.data import discover_samples, read_pair


def box_from_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bounding box (x0, y0, x1, y1) of a H x W bool mask, in a size x size frame."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    return torch.tensor([xs.min() * size / width, ys.min() * size / height,
                         (xs.max() + 1) * size / width, (ys.max() + 1) * size / height], dtype=torch.float32)


def save_probability(logits: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    probability = torch.sigmoid(logits.float())[0, 0].numpy()
    Image.fromarray(np.round(probability * 255).astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="clip layout root (<clip>/frames, <clip>/masks)")
    parser.add_argument("--clips", nargs="*", help="clips to score (default: the checkpoint's validation clips)")
    parser.add_argument("--out", type=Path, default=Path("runs/validation"))
    args = parser.parse_args()

    clips = args.clips or read_checkpoint(args.checkpoint)["meta"].get("val_clips")
    if not clips:
        sys.exit("validate_model: the checkpoint names no validation clips; pass --clips")
    samples = [s for s in discover_samples(args.data) if s.group in set(clips)]
    autosam = load_model_from_checkpoint(args.checkpoint, "autosam")
    light = load_model_from_checkpoint(args.checkpoint, "light")
    sam = autosam.sam
    gt_root = args.out / "gt"
    started = time.perf_counter()
    with torch.inference_mode():
        for sample in tqdm(samples, desc="validation frames", unit="frame"):
            image, mask = read_pair(sample)
            frame = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
            size = tuple(mask.shape)
            embeddings = sam.encode(frame)
            name = f"{sample.group}/{sample.image.stem}.png"
            save_probability(autosam(frame, size, image_embeddings=embeddings), args.out / "AutoSAM" / name)
            save_probability(light(frame, size), args.out / "Light-h(g(I))" / name)
            box = box_from_mask(mask, sam.image_size)[None]
            save_probability(upsample_logits(sam.decode_with_boxes(embeddings, box), size),
                             args.out / "LiteMedSAM-GT-box" / name)
            (gt_root / sample.group).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt_root / name)
    print(f"{len(samples)} frames of clips {', '.join(clips)} in {time.perf_counter() - started:.0f} s")
    methods = ["AutoSAM", "Light-h(g(I))", "LiteMedSAM-GT-box"]
    command = ["vps-eval", "--gt-root", str(gt_root), "--protocol", "video", "--out-dir", str(args.out / "eval"),
               "--methods", *[str(args.out / m) for m in methods]]
    print(" ".join(command), flush=True)
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
