"""Scoring models on a held-out set the way the papers do: probability maps of several methods per image (tiled for
stills larger than the model input), 8-bit PNGs beside the ground truth, scored with ``vps-eval``.

Shared by ``scripts/validate_model.py`` (every number of MODEL_CARD.md) and ``scripts/paper_tables.py`` (the two
papers' tables). A *method* turns one image window into low-resolution mask logits: a trained model (AutoSAM, the
light model h(g(I)), a prompt-free head) or the frozen SAM prompted from the ground truth (vps/modeling/prompts.py).
All methods of one image share SAM's embedding of each window, computed once and kept in the embedding cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from vps.modeling.autosam import LightModel, upsample_logits
from vps.modeling.prompts import prompted_logits
from vps.modeling.sam import FrozenSam
from vps.tiling import tiled_logits
from vps.train.cache import EmbeddingCache
from vps.train.data import Sample, split_sources
from vps.train.negatives import polyp_free_crops


class ValidationError(ValueError):
    """A checkpoint or test set that cannot be scored; the message says why."""


def probability_map(logits: torch.Tensor) -> np.ndarray:
    """1 x 1 x H x W logits -> H x W uint8 ``round(255 * sigmoid)``."""
    return np.round(torch.sigmoid(logits.float())[0, 0].cpu().numpy() * 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def is_stills(samples: List[Sample]) -> bool:
    """Stills count as one clip each (group == image stem); clips group several frames."""
    return all(s.group == s.image.stem for s in samples)


def sources_are_stills(samples: List[Sample]) -> Dict[str, bool]:
    """{source: whether its samples are stills (image protocol) rather than clips (video protocol)}."""
    return {source: is_stills([s for s in samples if s.source == source]) for source in {s.source for s in samples}}


def relative_path(sample: Sample, stills: bool) -> str:
    """Where a sample's map goes below a method's folder: ``<source>/<stem>.png`` or ``<source>/<clip>/<stem>.png``."""
    return f"{sample.source}/{sample.image.stem}.png" if stills else f"{sample.source}/{sample.group}/{sample.image.stem}.png"


def validation_samples(meta: dict, roots: Sequence[Path], with_crops: bool = True):
    """(positive validation samples, polyp-free crops) exactly as the training run of a checkpoint drew them;
    ``with_crops=False`` skips finding the crops (each reads a mask) and gives none."""
    val_clips = meta.get("val_clips")
    if not val_clips:
        raise ValidationError("the checkpoint names no validation clips")
    _, val = split_sources(list(roots), val_clips, 0.0, int(meta.get("split_seed", 0)))
    negatives = meta.get("negatives") or {}
    crops = polyp_free_crops(val, float(negatives.get("val_fraction", 0.0)), float(negatives.get("min_side", 0.3)),
                             int(meta.get("split_seed", 0))) if negatives and with_crops else []
    return val, crops


def run_vps_eval(gt_root: Path, method_roots: List[Path], protocol: str, out_dir: Path,
                 bootstrap: int = 0) -> Dict[str, dict]:
    """Scores ``method_roots`` against ``gt_root`` with vps-eval (all metrics); returns {method: summary}, in the
    order of ``method_roots``. vps-eval's own output (its table, warnings) goes to this process's console.
    ``bootstrap``: also 95 % intervals from that many resamples, in ``<out_dir>/intervals.csv``."""
    arguments = ["--gt-root", str(gt_root), "--protocol", protocol, "--out-dir", str(out_dir), "--all",
                 *(["--bootstrap", str(bootstrap)] if bootstrap else []), "--methods", *[str(m) for m in method_roots]]
    print(" ".join(["vps-eval", *arguments]), flush=True)
    # vps-eval of this interpreter's environment, whether or not its bin folder is on PATH
    result = subprocess.run([sys.executable, "-m", "eval.cli", *arguments])
    if result.returncode != 0:
        raise ValidationError(f"vps-eval failed on {gt_root} (exit status {result.returncode}; its error is above)")
    summary = json.loads((out_dir / "summary.json").read_text())
    return summary if len(method_roots) > 1 else {method_roots[0].parent.name: summary}


class WindowEmbeddings:
    """SAM's embedding of an image window, from the embedding cache (keyed by the window's pixels, as in training)
    or encoded here and stored there."""

    def __init__(self, sam: FrozenSam, cache: Optional[EmbeddingCache] = None) -> None:
        self.sam = sam
        self.cache = cache
        self.reused = 0
        self.encoded = 0

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        """1 x 3 x h x w in [0, 1] (uint8 values / 255) -> 1 x C x e x e embedding."""
        key = None
        if self.cache is not None:
            pixels = (window[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            key = EmbeddingCache.image_key(pixels)
            cached = self.cache.get(key, "identity")
            if cached is not None:
                self.reused += 1
                return cached[None].float().to(window.device)
        embedding = self.sam.encode(window)
        self.encoded += 1
        if key is not None:  # a rerun (another model on the same images) finds it
            self.cache.put(key, "identity", embedding[0])
        return embedding


class MapMethod:
    """One row of a table: image windows -> low-resolution mask logits (B x 1 x h x w)."""

    name: str
    needs_embedding: bool = True

    def logits(self, images: torch.Tensor, embeddings: Optional[torch.Tensor], masks: Sequence[np.ndarray],
               done: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``images`` B x 3 x h x w in [0, 1]; ``embeddings`` SAM's (None when no method needs them); ``masks`` the
        windows' ground truth; ``done`` the logits other methods gave for the same windows, by name."""
        raise NotImplementedError


class ModelMethod(MapMethod):
    """A trained model with ``low_res_logits(images, embeddings)``: AutoSAM, the light model or a prompt-free head."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name = name
        self.model = model
        self.needs_embedding = not isinstance(model, LightModel)

    def logits(self, images, embeddings, masks, done):
        return self.model.low_res_logits(images, embeddings)


class PromptMethod(MapMethod):
    """The frozen SAM prompted from the ground truth (``prompted_logits``), or with AutoSAM's output as its mask
    prompt (``autosam_mask``: ``autosam`` gives that output; taken from ``done`` when it ran already)."""

    def __init__(self, name: str, sam: FrozenSam, baseline: str, autosam: Optional[ModelMethod] = None) -> None:
        if baseline == "autosam_mask" and autosam is None:
            raise ValueError(f"{name}: the autosam_mask baseline needs the AutoSAM model whose output prompts SAM")
        self.name = name
        self.sam = sam
        self.baseline = baseline
        self.autosam = autosam

    def logits(self, images, embeddings, masks, done):
        autosam_logits = None
        if self.baseline == "autosam_mask":
            autosam_logits = done.get(self.autosam.name)
            if autosam_logits is None:
                autosam_logits = self.autosam.logits(images, embeddings, masks, done)
        return prompted_logits(self.sam, embeddings, self.baseline, list(masks), autosam_logits)


def method_maps(image: np.ndarray, mask: np.ndarray, methods: Sequence[MapMethod], embed: WindowEmbeddings,
                tile: Optional[int] = None) -> Dict[str, np.ndarray]:
    """8-bit probability maps of every method for one image: {name: H x W uint8}.

    ``image`` H x W x 3 uint8, ``mask`` H x W bool (the ground truth, for the prompted baselines). With ``tile``, the
    image is segmented in overlapping ``tile`` x ``tile`` windows blended back (vps/tiling.py; the window's part of the
    mask prompts SAM); otherwise as a whole. Each window is embedded once for all methods.
    """
    height, width = mask.shape
    # the mask travels with the image as a fourth channel, so every window carries its own part of it
    stacked = torch.cat([torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255,
                         torch.from_numpy(np.asarray(mask, dtype=np.float32))[None]]).to(embed.sam.pixel_mean.device)
    needs_embedding = any(method.needs_embedding for method in methods)

    def predict(windows: torch.Tensor, size) -> torch.Tensor:
        rows = []
        for window in windows:
            images, masks = window[None, :3], [window[3].cpu().numpy() > 0.5]
            embeddings = embed(images) if needs_embedding else None
            done: Dict[str, torch.Tensor] = {}
            for method in methods:
                done[method.name] = method.logits(images, embeddings, masks, done).float()
            rows.append(torch.cat([upsample_logits(done[m.name], size or images.shape[-2:]) for m in methods], 1))
        return torch.cat(rows)

    if tile is None:
        logits = predict(stacked[None], (height, width))
    else:
        logits = tiled_logits(lambda windows: predict(windows, None), stacked, tile)
    return {method.name: probability_map(logits[:, i:i + 1]) for i, method in enumerate(methods)}
