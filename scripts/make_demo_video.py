"""Write a short colonoscopy clip as an mp4 for `make demo`.

Uses a validation clip of the real CVC-ClinicDB data in ../shared/data when it is there (the default
model never trained on it), otherwise a synthetic clip (a reddish blob drifting over a pink,
textured background) so that the demo also runs on a machine without the data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np
from natsort import natsorted
from PIL import Image

SHARED_CLIP = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cvc-clinicdb-video" / "02" / "frames"


def synthetic_frames(count: int = 50, size=(384, 288), seed: int = 0):
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[:height, :width]
    texture = rng.normal(0, 6, size=(height, width, 1))
    for index in range(count):
        cx, cy = 120 + 2.5 * index, 140 + 30 * np.sin(index / 8)
        background = np.array([185, 95, 85]) * (1 - 0.4 * ((xx - width / 2) ** 2 + (yy - height / 2) ** 2)[..., None]
                                                 / (width ** 2 / 4 + height ** 2 / 4))
        blob = np.exp(-(((xx - cx) / 38) ** 2 + ((yy - cy) / 30) ** 2))[..., None]
        frame = background * (1 - blob) + np.array([205, 120, 90]) * blob + texture
        yield np.clip(frame, 0, 255).astype(np.uint8)


def real_frames(folder: Path):
    for path in natsorted(folder.glob("*.png")):
        yield np.asarray(Image.open(path).convert("RGB"))


def write_video(frames, path: Path, fps: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            if count == 0:
                stream.height, stream.width = frame.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
            count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--fps", type=int, default=10)
    args = parser.parse_args()
    source = real_frames(SHARED_CLIP) if SHARED_CLIP.is_dir() else synthetic_frames()
    count = write_video(source, args.out, args.fps)
    kind = f"CVC-ClinicDB clip 02 ({SHARED_CLIP})" if SHARED_CLIP.is_dir() else "a synthetic clip"
    print(f"wrote {args.out}: {count} frames of {kind}")


if __name__ == "__main__":
    main()
