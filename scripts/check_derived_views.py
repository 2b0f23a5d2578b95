"""How far a derived view is from a cached one: SAM's embedding of a transformed image against the transformed
embedding of the image (``cache.derived_views``, docs/training.md).

For a seeded sample of the validation images recorded in a checkpoint, and each view, it decodes the model's dense
prompt for the transformed image with both embeddings and prints the mean Dice of each against the transformed
ground truth, the mean absolute gap between the two, and the embeddings' cosine similarity:

    python scripts/check_derived_views.py --checkpoint vps/weights/autosam_litemedsam_polyp.pt --images 24
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import vps  # noqa: F401
from eval.metrics import binary_dice_iou
from vps.modeling import default_checkpoint_path, load_model_from_checkpoint, read_checkpoint
from vps.train.augment import VIEWS, apply_view
from vps.train.data import read_pair
from vps.train.dataset import to_square_tensor
from vps.validation import ValidationError, validation_samples

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def dice(logits: torch.Tensor, truth: np.ndarray) -> float:
    """Dice at probability 0.5 of 1 x 1 x h x w logits, upsampled, against an H x W boolean mask."""
    probability = torch.sigmoid(F.interpolate(logits.float(), size=truth.shape, mode="bilinear", align_corners=False))
    return binary_dice_iou(probability[0, 0].numpy(), truth)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint_path())
    parser.add_argument("--data", type=Path, nargs="+", default=[SHARED / "cvc-clinicdb-video", SHARED / "kvasir-seg"])
    parser.add_argument("--images", type=int, default=24, help="validation images drawn (seed 0)")
    parser.add_argument("--views", nargs="+", default=["hflip", "vflip", "rot180"], choices=sorted(VIEWS))
    args = parser.parse_args()
    positives, _ = validation_samples(read_checkpoint(args.checkpoint)["meta"], args.data, with_crops=False)
    picked = np.random.RandomState(0).choice(len(positives), min(args.images, len(positives)), replace=False)
    model = load_model_from_checkpoint(args.checkpoint, "autosam", box_refinement=False, flip_tta=False)
    sam, side = model.sam, model.sam.image_size
    rows = []
    with torch.inference_mode():
        for index in picked:
            image, mask = read_pair(positives[index])
            frame = to_square_tensor(image, side)[None]
            identity = sam.encode(frame)
            truth = torch.from_numpy(np.asarray(mask, dtype=bool))
            for view in args.views:
                turned = apply_view(frame, view)
                encoded, derived = sam.encode(turned), apply_view(identity, view)
                prompt = model.prompt_generator(turned)
                target = apply_view(truth, view).numpy()
                rows.append({"view": view, "Dice encoded": dice(sam.decode(encoded, prompt), target),
                             "Dice derived": dice(sam.decode(derived, prompt), target),
                             "cosine": F.cosine_similarity(encoded.flatten(1), derived.flatten(1)).item()})
    table = pd.DataFrame(rows)
    table["|gap|"] = (table["Dice encoded"] - table["Dice derived"]).abs()
    print(f"{len(picked)} validation images, {args.checkpoint}")
    print(table.groupby("view", sort=False).mean().to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    try:
        main()
    except ValidationError as error:
        raise SystemExit(f"check_derived_views: {error}") from None
