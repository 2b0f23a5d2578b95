"""Synthetic colonoscopy-like frames with a known polyp mask: for examples, the demo and tests.

The polyp is a shaded red dome with a dark rim and specular highlights on textured pink mucosa, with a
dark lumen and the endoscope's black corners. The built-in model segments it (Dice about 0.85
against the drawn mask), so results on these frames are not trivially empty, and nothing needs
real data.
"""

from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

MUCOSA_RGB = (200, 110, 95)
POLYP_RGB = (215, 100, 90)  # redder than the mucosa, as polyps often are


def _lighting(width: int, height: int) -> np.ndarray:
    """H x W float: light falling off from the centre, with a dark lumen at the top right."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    lumen = np.exp(-(((xx - width * 0.8) / (width * 0.12)) ** 2 + ((yy - height * 0.25) / (height * 0.15)) ** 2))
    light = 1.0 - 0.9 * (((xx - width / 2) / width) ** 2 + ((yy - height / 2) / height) ** 2)
    return np.clip(light - 0.6 * lumen, 0.1, 1.0)


def _mucosa_colour(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 float: pink with a smooth random texture."""
    coarse = rng.normal(0, 1, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.stack([base + amplitude * texture for base, amplitude in zip(MUCOSA_RGB, (10, 8, 6))], -1)


def polyp_frame(width: int = 384, height: int = 288, center: Tuple[float, float] = (0.42, 0.55),
                seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One frame: (H, W, 3) uint8 RGB and its (H, W) bool polyp mask.

    center: the polyp's centre as fractions of (width, height); its radii are 14 % of the width and
    17 % of the height. ``seed`` draws the mucosa's texture.
    """
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    cx, cy, rx, ry = width * center[0], height * center[1], width * 0.14, height * 0.17
    radius = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)  # 1 on the polyp's outline
    inside = radius < 1
    rim = np.exp(-((radius - 1) / 0.06) ** 2)
    dome = np.sqrt(np.clip(1 - radius ** 2, 0, 1))
    lit_from_top_left = np.clip(-0.5 * (xx - cx) / rx - 0.5 * (yy - cy) / ry, -1, 1)
    polyp_shade = (0.75 + 0.35 * lit_from_top_left * dome) * (1 - 0.25 * rim)
    polyp = np.array(POLYP_RGB, np.float32) * polyp_shade[..., None]
    colour = np.where(inside[..., None], polyp, _mucosa_colour(width, height, np.random.default_rng(seed)))
    image = colour * (_lighting(width, height) * (1 - 0.3 * rim))[..., None]
    highlights = (np.exp(-(((xx - cx + rx * 0.35) / 5) ** 2 + ((yy - cy + ry * 0.4) / 3) ** 2))
                  + 0.7 * np.exp(-(((xx - cx + rx * 0.1) / 3) ** 2 + ((yy - cy - ry * 0.2) / 2) ** 2)))
    image += 255 * highlights[..., None]
    corners = ((xx - width / 2) / (width * 0.62)) ** 2 + ((yy - height / 2) / (height * 0.62)) ** 2 > 1
    image[corners] = 0  # outside the endoscope's round field of view
    return np.clip(image, 0, 255).astype(np.uint8), inside


def polyp_clip(count: int = 8, width: int = 384, height: int = 288, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A clip of a polyp drifting left to right: (count, H, W, 3) uint8 RGB frames and (count, H, W) bool masks."""
    frames, masks = [], []
    for index in range(count):
        step = index / max(count - 1, 1)
        frame, mask = polyp_frame(width, height, (0.32 + 0.25 * step, 0.55 + 0.05 * np.sin(3 * step)), seed)
        frames.append(frame)
        masks.append(mask)
    return np.stack(frames), np.stack(masks)
