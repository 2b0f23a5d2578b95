"""SAM prompts built from a known mask: the reference baselines of the AutoSAM paper (its MoNuSeg/GlaS table).

The frozen SAM is prompted with what a person (or another model) would give it, read off the ground
truth: its bounding box, a point inside it, the mask itself, or AutoSAM's own output as the mask prompt.
All coordinates are in the encoder's square input (``sam.image_size``), as FrozenSam resizes every image
to it without padding; ``prompted_logits`` runs one baseline on a batch. Images with many objects (nuclei,
glands) get one prompt per connected component (``gt_points``, ``gt_boxes``), each decoded on its own and
the masks united, since a SAM prompt names one object.

LiteMedSAM (MedSAM distilled) was trained with box prompts only: it segments from boxes, but point and mask
prompts leave its output empty (measured on MoNuSeg). The point and mask baselines are meant for SAM ViT
weights (``--sam vit_b --sam-checkpoint ...``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vps.modeling.sam import FrozenSam

# A binary mask prompt becomes +/- this logit. SAM's mask prompt is normally its own previous output (logits
# of a few units to about 20 in magnitude); the sign carries the mask, the size saturates SAM's mask input.
MASK_PROMPT_LOGIT = 10.0
PAD_LABEL = -1  # SAM's label for "no point" (padding)
SAM_PROMPT_BASELINES = ("gt_box", "gt_boxes", "gt_point", "gt_points", "gt_mask", "autosam_mask")
UNION_CHUNK = 32  # single-object prompts decoded per call by the per-component baselines


def box_from_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bounding box (x0, y0, x1, y1) of a H x W bool mask, in a size x size frame."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    return torch.tensor([xs.min() * size / width, ys.min() * size / height,
                         (xs.max() + 1) * size / width, (ys.max() + 1) * size / height], dtype=torch.float32)


def boxes_from_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """The bounding box of every 8-connected component of a H x W bool mask: N x 4 (x0, y0, x1, y1), size x size frame."""
    labels, _ = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), dtype=int))
    return boxes_from_labels(labels, size)


def largest_component_boxes(mask: np.ndarray, size: int, limit: int, min_area: int = 0) -> torch.Tensor:
    """The bounding boxes of the ``limit`` largest 8-connected components of a H x W bool mask with at least
    ``min_area`` pixels: N x 4 (x0, y0, x1, y1) in a size x size frame, largest first (N = 0 when there is none)."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    chosen = [label for label in 1 + np.argsort(-areas, kind="stable")[:limit] if areas[label - 1] >= min_area]
    return boxes_from_labels(labels, size, chosen)


def boxes_from_labels(labels: np.ndarray, size: int, chosen: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The bounding box of every label (1..N) of a H x W label image, or of the ``chosen`` labels in that order:
    N x 4 (x0, y0, x1, y1), size x size frame."""
    height, width = labels.shape
    slices = ndimage.find_objects(labels)
    if chosen is not None:
        slices = [slices[label - 1] for label in chosen]
    boxes = [(cols.start * size / width, rows.start * size / height, cols.stop * size / width, rows.stop * size / height)
             for rows, cols in slices]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def points_from_mask(mask: np.ndarray, size: int, per_component: bool = True) -> torch.Tensor:
    """Interior points of a H x W bool mask: N x 2 (x, y) in a size x size frame (N = 0 for an empty mask).

    Each point is the mask pixel farthest from the mask's boundary (Euclidean distance transform; the image
    border counts as boundary), i.e. the most interior point, not a centroid that may fall outside a curved
    object. ``per_component``: one point per 8-connected component (every nucleus or gland gets one);
    otherwise one point for the whole image, in its deepest component.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if per_component:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        flat = ndimage.maximum_position(depth, labels, index=np.arange(1, count + 1)) if count else []
        positions = [tuple(p) for p in flat]
    else:
        positions = [np.unravel_index(np.argmax(depth), depth.shape)] if mask.any() else []
    points = [(x * size / width, y * size / height) for y, x in positions]
    return torch.tensor(points, dtype=torch.float32).reshape(-1, 2)


def pad_points(point_sets: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """B sets of N_i x 2 foreground points -> (B x N x 2 coordinates, B x N labels), padded with SAM's label -1.

    N = max(1, max N_i): an image without points gets one padding point, i.e. no point prompt.
    """
    count = max([1, *(len(p) for p in point_sets)])
    coords = torch.zeros(len(point_sets), count, 2)
    labels = torch.full((len(point_sets), count), PAD_LABEL, dtype=torch.int64)
    for i, points in enumerate(point_sets):
        coords[i, :len(points)] = points
        labels[i, :len(points)] = 1
    return coords, labels


def mask_prompt_from_mask(mask: np.ndarray, size: int = 256, logit: float = MASK_PROMPT_LOGIT) -> torch.Tensor:
    """A H x W bool mask as SAM's low-resolution mask prompt: 1 x size x size logits, +logit inside, -logit outside.

    The mask is resized to the square like the image (area average, then > 0.5); ``size`` is SAM's mask input
    side, 4x the embedding's (256 for LiteMedSAM and SAM ViT).
    """
    tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    inside = F.interpolate(tensor, size=(size, size), mode="area")[0] > 0.5
    return torch.where(inside, logit, -logit).float()


def union_of_prompts(sam: FrozenSam, image_embedding: torch.Tensor, points: Optional[torch.Tensor] = None,
                     boxes: Optional[torch.Tensor] = None, chunk: int = UNION_CHUNK) -> torch.Tensor:
    """One image, N single-object prompts (N points or N boxes), each decoded on its own as SAM is meant to be
    used (a prompt names one object), the N masks united (the maximum of their logits): 1 x 1 x 256 x 256.

    No prompt (an empty ground truth) gives an empty mask (all logits -MASK_PROMPT_LOGIT).
    """
    prompts = points if points is not None else boxes
    side = 4 * sam.embedding_shape[-1]
    united = torch.full((1, 1, side, side), -MASK_PROMPT_LOGIT, device=image_embedding.device)
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk].to(image_embedding.device)
        embeddings = image_embedding.expand(len(part), -1, -1, -1)
        if points is not None:
            labels = torch.ones(len(part), 1, dtype=torch.int64, device=part.device)
            logits = sam.decode_with_prompts(embeddings, points=(part[:, None, :], labels))
        else:
            logits = sam.decode_with_prompts(embeddings, boxes=part)
        united = torch.maximum(united, logits.float().amax(0, keepdim=True))
    return united


def prompted_logits(sam: FrozenSam, image_embeddings: torch.Tensor, method: str,
                    masks: Sequence[np.ndarray] = (), autosam_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One SAM prompt baseline on a batch: B x 1 x 256 x 256 low-resolution mask logits.

    Arguments:
      sam: the frozen SAM whose embeddings these are.
      image_embeddings: B x 256 x 64 x 64.
      method: ``gt_box`` (the mask's bounding box, one per image), ``gt_boxes`` (one box per connected component,
        each its own prompt, the masks united), ``gt_point`` (one interior point per image), ``gt_points`` (one
        interior point per connected component, each its own prompt, the masks united), ``gt_mask`` (the mask
        as the mask prompt), ``autosam_mask`` (AutoSAM's own output as the mask prompt).
      masks: B ground-truth H x W bool masks (any size; not needed for ``autosam_mask``).
      autosam_logits: B x 1 x 256 x 256 AutoSAM low-resolution logits (``AutoSAM.low_res_logits``), for
        ``autosam_mask``.
    """
    if method not in SAM_PROMPT_BASELINES:
        raise ValueError(f"unknown SAM prompt baseline '{method}'; expected one of {', '.join(SAM_PROMPT_BASELINES)}")
    device = image_embeddings.device
    if method == "autosam_mask":
        if autosam_logits is None:
            raise ValueError("the autosam_mask baseline needs AutoSAM's low-resolution logits")
        return sam.decode_with_prompts(image_embeddings, mask_inputs=autosam_logits)
    if len(masks) != image_embeddings.shape[0]:
        raise ValueError(f"{method}: {image_embeddings.shape[0]} embeddings but {len(masks)} ground-truth masks")
    if method == "gt_box":
        boxes = torch.stack([box_from_mask(m, sam.image_size) for m in masks]).to(device)
        return sam.decode_with_prompts(image_embeddings, boxes=boxes)
    if method == "gt_mask":
        mask_size = 4 * sam.embedding_shape[-1]
        prompts = torch.stack([mask_prompt_from_mask(m, mask_size) for m in masks]).to(device)
        return sam.decode_with_prompts(image_embeddings, mask_inputs=prompts)
    if method == "gt_point":
        coords, labels = pad_points([points_from_mask(m, sam.image_size, per_component=False) for m in masks])
        return sam.decode_with_prompts(image_embeddings, points=(coords.to(device), labels.to(device)))
    if method == "gt_points":
        return torch.cat([union_of_prompts(sam, embedding[None], points=points_from_mask(m, sam.image_size))
                          for embedding, m in zip(image_embeddings, masks)])
    return torch.cat([union_of_prompts(sam, embedding[None], boxes=boxes_from_mask(m, sam.image_size))
                      for embedding, m in zip(image_embeddings, masks)])
