"""Video and frame I/O for ``vps-segment``: frame sources, a prefetching reader, atomic writers.

Sources stream frames one at a time with their timestamps (a video file through PyAV or decord, a
folder of images, a SUN-SEG style root with one folder per clip); nothing holds a whole video in
memory. Writers put their output under a temporary name in the destination folder and rename it
only when the clip is complete, so an error or Ctrl-C never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from natsort import natsorted

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DECODERS = ("av", "decord")
DEFAULT_FOLDER_FPS = Fraction(25)

# H.264 with a constant quantiser of 0 is lossless; with the "gray" pixel format the luma plane is
# the mask itself, so decoded masks equal the written ones bit for bit (tests check it). The "ultrafast"
# preset: the light model's whole vps-segment process took 0.92x the wall time of "veryfast" (5 alternated
# pairs, 800 frames at 384x288, 2-core Intel Xeon, 2026-11-27) for files about 1.8x larger (about 2 KB a frame).
MASK_CODEC = "libx264"
MASK_CODEC_OPTIONS = {"qp": "0", "preset": "ultrafast"}
# No B-frames in the overlay: with reordered frames the container's duration comes from decode
# timestamps, which lag a variable-frame-rate clip's last frames (a 1.04 s clip would say 0.55 s).
OVERLAY_CODEC_OPTIONS = {"crf": "20", "preset": "veryfast", "bf": "0"}


class InputError(ValueError):
    """A bad input or output (missing, unreadable, corrupt, exists): one line, shown to the user."""


# ---- clips: what the inputs on the command line stand for --------------------------------------


@dataclass(frozen=True)
class Clip:
    """One sequence of frames: a video file or a folder of images. ``case`` names its outputs."""

    case: str
    path: Path
    kind: str  # "video", "frames" or "stills" (images of any size, segmented one by one)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def list_frames(folder: Path) -> List[Path]:
    """The image files of a frame folder in natural order (2.png before 10.png); hidden files are ignored.

    Raises InputError when the folder holds a file that is not an image.
    """
    files = [p for p in folder.iterdir() if p.is_file() and not _is_hidden(p)]
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        raise InputError(f"{folder}: not an image: {natsorted(others)[0]} (a frame folder holds only "
                         f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files)")
    return natsorted(files, key=lambda p: p.name)


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.iterdir())


def _frame_folder_of(folder: Path) -> Optional[Path]:
    """``folder`` itself if it holds images, else its ``frames``/``Frame`` subfolder that does (CVC layout)."""
    if _has_images(folder):
        return folder
    for name in ("frames", "Frame", "images"):
        if (folder / name).is_dir() and _has_images(folder / name):
            return folder / name
    return None


def find_clips(path: str | Path) -> List[Clip]:
    """The clips an input path stands for, in natural order.

    - a video file: one clip named after its stem;
    - a folder of images: one clip named after the folder;
    - a clip folder (``<clip>/frames``, ``<clip>/Frame`` or Kvasir's ``<clip>/images``, beside
      ``masks/``, which is ignored): one clip named after ``<clip>``;
    - a SUN-SEG style root (``Frame/<case>/*.jpg``), or a folder of clip folders (``<case>/*.png`` or
      ``<case>/frames/*.png``): one clip per case folder;
    - a folder of video files: one clip per video.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise InputError(f"cannot read {path}: permission denied")
        return [Clip(path.stem, path, "video")]
    if not os.access(path, os.R_OK | os.X_OK):
        raise InputError(f"cannot read folder {path}: permission denied")
    frames = _frame_folder_of(path)
    if frames is not None:
        return [Clip(path.name, frames, "frames")]
    root = path / "Frame" if (path / "Frame").is_dir() else path
    clips = []
    for child in natsorted((p for p in root.iterdir() if not _is_hidden(p)), key=lambda p: p.name):
        if child.is_dir():
            frames = _frame_folder_of(child)
            if frames is not None:
                clips.append(Clip(child.name, frames, "frames"))
        elif child.suffix.lower() in VIDEO_EXTENSIONS:
            clips.append(Clip(child.stem, child, "video"))
    if not clips:
        raise InputError(f"{path}: no video, no images and no clip folders found")
    return clips


def distributed_env() -> Tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as set by torchrun; (0, 1, 0) outside it."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local_rank


def shard(items: Sequence, rank: int, world: int) -> list:
    """This rank's share: items rank, rank + world, ... (every item goes to exactly one rank)."""
    return list(items[rank::world])


# ---- frame sources ----------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What a writer needs to reproduce the input's timing and size."""

    width: int
    height: int
    fps: Fraction  # the average rate; frame times are the source's timestamps, in time_base units
    num_frames: Optional[int]  # None when the container does not say
    time_base: Optional[Fraction] = field(default=None, compare=False)  # None: 1 / fps


def quiet_decoders() -> None:
    """Silence FFmpeg's own log lines (decord bundles its own FFmpeg); errors reach the user as exceptions."""
    try:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
    except ImportError:
        pass
    import av

    av.logging.set_level(None)


def _first_line(error: BaseException) -> str:
    """A one-line reason: FFmpeg's message without its errno and file name, else the first line."""
    strerror = getattr(error, "strerror", None)
    if strerror:
        return str(strerror)
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def probe_video(path: Path) -> VideoInfo:
    """Size, frame rate and frame count of a video file, from its container (PyAV, no decoding)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream (not a video, or an empty one)")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = stream.frames or None
            width, height = stream.codec_context.width, stream.codec_context.height
            time_base = stream.time_base
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable video ({_first_line(error)})") from None
    if not width or not height:
        raise InputError(f"{path}: not a readable video (no frame size)")
    return VideoInfo(width, height, Fraction(fps) if fps else DEFAULT_FOLDER_FPS, frames,
                     Fraction(time_base) if time_base else None)


class FrameSource:
    """Iterates over (name, frame, pts) triples: frame is H x W x 3 uint8 RGB, pts its timestamp in
    ``info.time_base`` units (None when the source has none). ``info`` describes the clip."""

    clip: Clip
    info: VideoInfo

    def __iter__(self) -> Iterator[Tuple[str, np.ndarray, Optional[int]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def video_frame_name(index: int) -> str:
    """Name of a video's frame ``index`` (0-based) in PNG outputs: 000000, 000001, ..."""
    return f"{index:06d}"


class VideoFileSource(FrameSource):
    """A video file decoded frame by frame with PyAV (default) or decord.

    decord decodes ahead in a thread of its own with no bound: when the model is slower than
    decoding, the decoded frames pile up and memory grows with the video's length. PyAV decodes
    only when asked, so the prefetcher's bounded queue bounds memory.
    """

    def __init__(self, clip: Clip, decoder: str = "av") -> None:
        if decoder not in DECODERS:
            raise InputError(f"unknown decoder '{decoder}'; expected one of {', '.join(DECODERS)}")
        self.clip = clip
        self.decoder = decoder
        self.info = probe_video(clip.path)
        self._reader = None
        if decoder == "decord":
            self._reader = self._open_decord()
            if self._reader is None:
                self.decoder = "av"  # decord missing or refuses the file: PyAV fallback
            else:
                self.info.num_frames = len(self._reader)
        if self.info.num_frames == 0:
            raise InputError(f"{clip.path}: the video has no frames")

    def _open_decord(self):
        try:
            import decord
        except ImportError:
            return None
        try:
            return decord.VideoReader(str(self.clip.path), ctx=decord.cpu(0), num_threads=1)
        except Exception:  # decord raises its own DECORDError or RuntimeError
            return None

    def __iter__(self) -> Iterator[Tuple[str, np.ndarray, Optional[int]]]:
        frames = self._iter_decord() if self.decoder == "decord" else self._iter_av()
        count = 0
        try:
            for frame, pts in frames:
                if frame.shape[:2] != (self.info.height, self.info.width):
                    raise InputError(f"{self.clip.path}: frame {count} is {frame.shape[1]}x{frame.shape[0]}, "
                                     f"expected {self.info.width}x{self.info.height}")
                yield video_frame_name(count), frame, pts
                count += 1
        except InputError:
            raise
        except Exception as error:  # any decoder error: corrupt data, truncated file
            raise InputError(f"{self.clip.path}: decoding failed at frame {count} ({_first_line(error)})") from None
        if count == 0:
            raise InputError(f"{self.clip.path}: the video has no frames")
        if self.info.num_frames is not None and count < self.info.num_frames:
            raise InputError(f"{self.clip.path}: decoding failed at frame {count} of {self.info.num_frames} "
                             "(truncated or corrupt video)")

    def _iter_decord(self) -> Iterator[Tuple[np.ndarray, Optional[int]]]:
        reader = self._reader
        time_base = self.info.time_base
        for index in range(len(reader)):
            frame = reader.next().asnumpy()
            seconds = float(reader.get_frame_timestamp(index)[0])  # decord gives seconds, start and end
            yield frame, round(seconds / time_base) if time_base else None

    def _iter_av(self) -> Iterator[Tuple[np.ndarray, Optional[int]]]:
        import av

        with av.open(str(self.clip.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24"), frame.pts

    def close(self) -> None:
        self._reader = None


class FrameFolderSource(FrameSource):
    """A folder of images, in natural order, one every 1 / fps seconds.

    Every frame must have the first one's size, unless ``any_size`` (stills: each image is
    segmented at its own size).
    """

    def __init__(self, clip: Clip, fps: Fraction = DEFAULT_FOLDER_FPS, any_size: bool = False) -> None:
        self.clip = clip
        self.any_size = any_size
        self.paths = list_frames(clip.path)
        if not self.paths:
            raise InputError(f"{clip.path}: no frames")
        height, width = self._read(self.paths[0]).shape[:2]
        self.info = VideoInfo(width, height, Fraction(fps), len(self.paths), 1 / Fraction(fps))

    def _read(self, path: Path) -> np.ndarray:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(f"{path}: not a readable image")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def __iter__(self) -> Iterator[Tuple[str, np.ndarray, Optional[int]]]:
        for index, path in enumerate(self.paths):
            frame = self._read(path)
            if not self.any_size and frame.shape[:2] != (self.info.height, self.info.width):
                raise InputError(f"{path}: frame is {frame.shape[1]}x{frame.shape[0]}, the folder's first frame "
                                 f"is {self.info.width}x{self.info.height} (mixed sizes; for images of different "
                                 "sizes use --stills)")
            yield path.stem, frame, index


def open_source(clip: Clip, decoder: str = "av", fps: Fraction = DEFAULT_FOLDER_FPS) -> FrameSource:
    """The frame source for a clip; ``fps`` is used for frame folders, which carry no frame rate."""
    if clip.kind in ("frames", "stills"):
        return FrameFolderSource(clip, fps, any_size=clip.kind == "stills")
    return VideoFileSource(clip, decoder)


def open_clip(video: str | Path | Clip, decoder: str = "av", fps: Fraction = DEFAULT_FOLDER_FPS) -> FrameSource:
    """The frame source of one clip: a ``Clip``, a video file, a frame folder or a CVC clip folder.

    A path that stands for several clips (a SUN-SEG root, a folder of videos) is an InputError:
    ``find_clips`` lists them, to be opened one at a time.
    """
    if not isinstance(video, Clip):
        clips = find_clips(video)
        if len(clips) > 1:
            names = ", ".join(clip.case for clip in clips[:3]) + (", ..." if len(clips) > 3 else "")
            raise InputError(f"{video} holds {len(clips)} clips ({names}); give one video or frame folder "
                             "(vps.video.find_clips lists the clips)")
        video = clips[0]
    return open_source(video, decoder, fps)


# ---- prefetching reader -----------------------------------------------------------------------


@dataclass
class Batch:
    """Consecutive frames: names, timestamps (``FrameSource`` pts) and a B x H x W x 3 uint8 tensor
    (pinned when asked), or a list of H x W x 3 tensors of different sizes (stills)."""

    names: List[str]
    frames: torch.Tensor | List[torch.Tensor]
    pts: List[Optional[int]]


_END = object()


class Prefetcher:
    """Decodes a source ahead in a background thread into a bounded queue of batches.

    Decoders (FFmpeg, OpenCV) release the GIL, so decoding overlaps the model. At most ``depth``
    batches wait in the queue, which bounds memory whatever the video's length. An error in the
    worker is raised in the consumer at the batch where it happened. ``stack=False`` gives each
    batch as a list of frames, which may differ in size.
    """

    def __init__(self, source: FrameSource, batch_size: int, depth: int = 3, pin_memory: bool = False,
                 stack: bool = True) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.source = source
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self.stack = stack
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="vps-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.pin_memory() if self.pin_memory else tensor

    def _batch(self, names: List[str], frames: List[np.ndarray], pts: List[Optional[int]]) -> Batch:
        if self.stack:
            return Batch(names, self._tensor(np.stack(frames)), pts)
        return Batch(names, [self._tensor(frame) for frame in frames], pts)

    def _work(self) -> None:
        names: List[str] = []
        frames: List[np.ndarray] = []
        pts: List[Optional[int]] = []
        try:
            for name, frame, timestamp in self.source:
                names.append(name)
                frames.append(frame)
                pts.append(timestamp)
                if len(frames) == self.batch_size:
                    if not self._put(self._batch(names, frames, pts)):
                        return
                    names, frames, pts = [], [], []
            if frames and not self._put(self._batch(names, frames, pts)):
                return
            self._put(_END)
        except BaseException as error:  # handed to the consumer thread
            self._put(error)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.source.close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- writers ----------------------------------------------------------------------------------


def partial_path(path: Path) -> Path:
    """The temporary name an output is written under, in the same folder (hidden, same suffix)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; make its folder; check it can be written."""
    if path.exists() and not overwrite:
        raise InputError(f"output exists: {path} (pass --overwrite to replace it)")
    if path.is_dir() and path.suffix:
        raise InputError(f"output is a folder: {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking_file = next((folder for folder in path.parents if folder.is_file()), None)
        reason = f"{blocking_file} is a file, not a folder" if blocking_file else error.strerror or _first_line(error)
        raise InputError(f"cannot write {path}: {reason}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: permission denied")


class _VideoWriter:
    """An H.264 video written with PyAV under a temporary name, renamed by ``close()``.

    Frames keep the source's timestamps (``info.time_base`` units, counted from the first frame),
    so a variable-frame-rate input gives an output of the same duration and timing.
    """

    def __init__(self, path: Path, info: VideoInfo, pix_fmt: str, options: dict) -> None:
        import av

        self.path = Path(path)
        self.temporary = partial_path(self.path)
        try:
            self._container = av.open(str(self.temporary), mode="w")
        except (av.error.FFmpegError, OSError) as error:
            raise InputError(f"cannot write {self.path}: {_first_line(error)}") from None
        self._stream = self._container.add_stream(MASK_CODEC, rate=info.fps, options=options)
        self._stream.width = info.width
        self._stream.height = info.height
        self._stream.pix_fmt = pix_fmt
        self._time_base = info.time_base or 1 / info.fps
        self._stream.codec_context.time_base = self._time_base
        self._step = max(1, round(1 / (info.fps * self._time_base)))  # one nominal frame, in time_base units
        self._first: Optional[int] = None
        self._last: Optional[int] = None

    def _next_pts(self, pts: Optional[int]) -> int:
        """The source's timestamp relative to its first frame; one nominal frame after the previous
        one where the source has none or goes backwards (the encoder needs increasing timestamps)."""
        if self._last is None:
            self._first = pts or 0
            return 0
        if pts is None:
            return self._last + self._step
        return max(pts - self._first, self._last + 1)

    def _encode(self, frame, pts: Optional[int] = None) -> None:
        frame.pts = self._last = self._next_pts(pts)
        frame.time_base = self._time_base
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> Path:
        """Flush, close and move the file to its final name."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        os.replace(self.temporary, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:
            pass
        self.temporary.unlink(missing_ok=True)


def _even(size: int) -> bool:
    return size % 2 == 0


class MaskVideoWriter(_VideoWriter):
    """Binary masks (H x W uint8, 0 or 255) as a lossless grey H.264 video (libx264, qp 0, gray)."""

    def __init__(self, path: Path, info: VideoInfo) -> None:
        super().__init__(path, info, "gray", MASK_CODEC_OPTIONS)

    def write(self, mask: np.ndarray, pts: Optional[int] = None) -> None:
        import av

        self._encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(mask), format="gray"), pts)


class OverlayVideoWriter(_VideoWriter):
    """Frames with the mask tinted and outlined, H.264 (crf 20) for a person to watch."""

    def __init__(self, path: Path, info: VideoInfo) -> None:
        # 4:2:0 needs even sides; an odd-sized input keeps full chroma instead
        pix_fmt = "yuv420p" if _even(info.width) and _even(info.height) else "yuv444p"
        super().__init__(path, info, pix_fmt, OVERLAY_CODEC_OPTIONS)

    def write(self, frame: np.ndarray, mask: np.ndarray, pts: Optional[int] = None) -> None:
        import av

        self._encode(av.VideoFrame.from_ndarray(draw_overlay(frame, mask), format="rgb24"), pts)


def draw_overlay(frame: np.ndarray, mask: np.ndarray, color=(0, 255, 0), alpha: float = 0.35) -> np.ndarray:
    """H x W x 3 RGB frame and H x W mask (nonzero = polyp) -> the frame tinted inside the mask, outlined."""
    out = frame.copy()
    inside = mask > 0
    if inside.any():
        tint = np.array(color, dtype=np.float32)
        out[inside] = (out[inside] * (1 - alpha) + tint * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, color, thickness=2)
    return out


class PngWriter:
    """8-bit probability maps as ``<root>/<case>/<frame>.png``, written into a hidden temporary
    folder ``<root>/.<case>.partial`` that replaces ``<root>/<case>`` when the clip is complete."""

    def __init__(self, root: Path, case: str, overwrite: bool = False) -> None:
        self.path = Path(root) / case
        self.temporary = Path(root) / f".{case}.partial"
        self.overwrite = overwrite
        shutil.rmtree(self.temporary, ignore_errors=True)
        try:
            self.temporary.mkdir(parents=True)
        except OSError as error:
            raise InputError(f"cannot write {self.path}: {error.strerror or _first_line(error)}") from None

    def write(self, name: str, probability: np.ndarray) -> None:
        target = self.temporary / f"{name}.png"
        if not cv2.imwrite(str(target), probability):
            raise InputError(f"cannot write {target}")

    def close(self) -> Path:
        if self.path.exists():
            shutil.rmtree(self.path)  # only reached with --overwrite (checked before the run)
        os.replace(self.temporary, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)


def read_mask_video(path: str | Path) -> np.ndarray:
    """All frames of a mask video as N x H x W uint8 (the luma plane, no colour conversion). For tests."""
    import av

    def luma(frame) -> np.ndarray:
        # FFmpeg decodes H.264 4:0:0 as yuv420p; converting it to "gray" would rescale the range
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
        return rows[:, :frame.width].copy()

    with av.open(str(path)) as container:
        return np.stack([luma(frame) for frame in container.decode(video=0)])


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: Fraction | int = 25,
                codec: str = "libx264", options: Optional[dict] = None,
                container_options: Optional[dict] = None) -> Path:
    """Write H x W x 3 RGB frames (any iterable, streamed) to a video with PyAV (test clips, benchmarks)."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps), options=options or {"crf": "18"})
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return path
