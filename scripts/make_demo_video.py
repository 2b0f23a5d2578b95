"""Write a short colonoscopy clip as an mp4 for `make demo`.

Uses a validation clip of the real CVC-ClinicDB data in ../shared/data when it is there (the default
model never trained on it), otherwise a synthetic clip (``vps.synthetic``: a drawn polyp drifting
over textured mucosa, which the built-in model segments) so that the demo also runs on a machine
without the data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np
from natsort import natsorted
from PIL import Image

from vps.synthetic import polyp_clip

SHARED_CLIP = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cvc-clinicdb-video" / "02" / "frames"


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
    source = real_frames(SHARED_CLIP) if SHARED_CLIP.is_dir() else iter(polyp_clip(25)[0])
    count = write_video(source, args.out, args.fps)
    kind = f"CVC-ClinicDB clip 02 ({SHARED_CLIP})" if SHARED_CLIP.is_dir() else "a synthetic clip"
    print(f"wrote {args.out}: {count} frames of {kind}")


if __name__ == "__main__":
    main()
