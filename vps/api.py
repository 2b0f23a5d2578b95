"""``vps.Segmenter``: the Python front door. Load a model once, then frames in, probability maps out.

    import vps

    seg = vps.Segmenter()                              # built-in AutoSAM, device and precision auto
    probs = seg.predict(frames)                        # uint8 (N, H, W, 3) RGB -> float32 (N, H, W) in [0, 1]
    masks = probs >= 0.5
    for index, frame, prob in seg.segment_video("clip.mp4"):   # streamed: (H, W, 3) uint8, (H, W) float32
        ...
    seg = vps.Segmenter(checkpoint="run/model.pt", model="light", device="cuda")

``vps-segment`` is built on this class: it constructs a Segmenter and writes what ``segment_batches``
yields. Errors are exceptions (ValueError, and its subclasses ``CheckpointError`` and
``vps.video.InputError``) with the messages ``vps-segment`` prints as its one-line errors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import vps.modeling as modeling
from vps.backends import BackendError, auto_candidates, backend_precision, build_failure, check_backend
from vps.inference import ExponentialSmoother, SegmentationEngine, autocast_dtype, resolve_device, resolve_precision
from vps.modeling import CheckpointError, LightModel
from vps.video import Clip, FrameSource, Prefetcher, open_clip


def load_model(checkpoint: Optional[str | Path] = None, model: str = "autosam", sam_backend: Optional[str] = None,
               sam_checkpoint: Optional[str | Path] = None, box_refinement: Optional[bool] = None,
               flip_tta: Optional[bool] = None, embedding_prompt: Optional[bool] = None) -> nn.Module:
    """AutoSAM (``model="autosam"``) or the light model (``"light"``) from a g/h checkpoint, or the frozen SAM with
    a prompt-free head (``"head"``) from a head checkpoint.

    ``checkpoint`` None: the built-in model in ``vps/weights``. ``sam_backend`` (litemedsam,
    vit_b/l/h) defaults to the checkpoint's; ``sam_checkpoint`` holds SAM ViT weights.
    """
    if checkpoint is None:
        checkpoint = modeling.default_checkpoint_path()
        if not checkpoint.is_file():
            raise CheckpointError(f"the built-in model {checkpoint} is not installed; pass --checkpoint FILE "
                                  "(Python: Segmenter(checkpoint=FILE))")
    return modeling.load_model_from_checkpoint(checkpoint, model=model, sam_backend=sam_backend,
                                               sam_checkpoint=sam_checkpoint, box_refinement=box_refinement,
                                               flip_tta=flip_tta, embedding_prompt=embedding_prompt)


def default_batch_size(model: nn.Module, device: torch.device) -> int:
    """Frames per model call when none is given: 32 on CUDA; on a CPU 1 for AutoSAM and 8 for the light
    model, the fastest on a 2-core CPU (``scripts/bench_segment.py --only light``: OpenVINO bf16 71 vs 61
    frames/s at batch 8 vs 4, eager bf16 45 vs 38, eager fp32 24 vs 24)."""
    if device.type == "cuda":
        return 32
    return 8 if isinstance(model, LightModel) else 1


def as_frame_batch(frames) -> Tuple[torch.Tensor, bool]:
    """One frame (H, W, 3) or a batch (N, H, W, 3) of uint8 RGB, numpy or torch -> (N x H x W x 3 uint8
    tensor, whether one frame was given). Anything else is a ValueError that says what was expected."""
    if not isinstance(frames, torch.Tensor):
        frames = np.ascontiguousarray(frames)  # also takes negative strides (frame[..., ::-1])
        if not frames.flags.writeable:  # np.asarray(PIL image): torch warns about read-only memory
            frames = frames.copy()
    dtype = str(frames.dtype).replace("torch.", "")
    if dtype != "uint8":
        hint = "; for floats in [0, 1] pass (frames * 255).round().astype(np.uint8)" if "float" in dtype else ""
        raise ValueError(f"frames must be uint8 RGB (0-255), got {dtype}{hint}")
    shape = tuple(frames.shape)
    if len(shape) not in (3, 4) or shape[-1] != 3 or 0 in shape[-3:-1]:
        hint = " (channels first? put the 3 colour channels last)" if len(shape) in (3, 4) and shape[-3] == 3 else ""
        raise ValueError(f"frames must be one RGB frame (H, W, 3) or a batch (N, H, W, 3), got shape {shape}{hint}")
    frames = torch.as_tensor(frames)
    return (frames[None], True) if frames.dim() == 3 else (frames, False)


def as_frame_list(frames: Sequence) -> List[torch.Tensor]:
    """A list of uint8 RGB frames (H, W, 3) of any sizes -> a list of H x W x 3 uint8 tensors."""
    tensors = []
    for index, frame in enumerate(frames):
        batch, single = as_frame_batch(frame)
        if not single:
            raise ValueError(f"frames[{index}]: a list holds single frames (H, W, 3), got shape {tuple(batch.shape)}")
        tensors.append(batch[0])
    return tensors


@dataclass
class SegmentedBatch:
    """Consecutive frames of one clip and their probability maps (B frames).

    first_index: the index of the batch's first frame in the clip (0-based).
    names: the frames' names: file stems for a frame folder, 000000, 000001, ... for a video.
    pts: the frames' timestamps in the source's ``info.time_base`` units (None where unknown).
    frames: B x H x W x 3 uint8 RGB, or a list of H x W x 3 arrays for stills of any sizes.
    probabilities: B x H x W float32 in [0, 1], or a list of H x W arrays for stills.
    """

    first_index: int
    names: List[str]
    pts: List[Optional[int]]
    frames: np.ndarray | List[np.ndarray]
    probabilities: np.ndarray | List[np.ndarray]


class Segmenter:
    """A polyp segmentation model ready to run: loaded once, on its device, in its precision.

    Arguments:
      checkpoint: a g/h checkpoint written by ``vps-train`` (None: the built-in model).
      model: ``"autosam"`` (g + frozen SAM, the default), ``"light"`` (g + surrogate decoder h, no
        SAM, about 25x faster on a CPU) or ``"head"`` (frozen SAM + a prompt-free head from a head checkpoint;
        with K > 1 named classes, ``class_names``, every map gets a class axis: (N, K, H, W), (K, H, W));
        or an already built module (AutoSAM, LightModel, or any
        module mapping B x 3 x H x W floats in [0, 1] to B x 1 x H x W logits), which is then put in
        eval mode, moved to the device and optimised in place (Conv+BN folded, channels-last).
      device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``.
      precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 on CUDA only). ``auto``:
        bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 on other CPUs.
      batch_size: frames per model call (None: 32 on CUDA; on a CPU 1 for AutoSAM, 4 for the light model).
      sam_backend, sam_checkpoint: SAM backend (default: the checkpoint's) and SAM ViT weights
        (LiteMedSAM's come installed).
      tile: stills (lists of frames of any sizes) larger than this side in pixels are segmented in
        overlapping tiles, blended (vps/tiling.py); None: each still whole at the model's input.
      backend: what runs the network: ``auto`` (default: OpenVINO where installed and the device is a
        CPU, else torch eager; see ``vps.backends.AUTO_ORDER``), ``eager``, ``openvino``, ``onnx`` (ONNX
        Runtime, fp32) or ``compile`` (``torch.compile``, minutes of start-up). The exported backends
        are built at construction, from an ONNX file cached under ~/.cache/vps.
      box_refinement: AutoSAM's second pass of SAM's decoder, prompted with the boxes of its first mask's
        components (``vps.modeling.AutoSAM``); None: the checkpoint's setting (the built-in model's is on).
      flip_tta: AutoSAM's dense prompt averaged with g's prompt for the mirrored frame (``vps.modeling.AutoSAM``);
        None: the checkpoint's setting (the built-in model's is on).
      embedding_prompt: mix the checkpoint's second prompt generator, on SAM's embedding, into g's prompt
        (``vps.modeling.AutoSAM``); None: when the checkpoint has one, False: g's prompt alone.

    Any frame size works: frames are resized to the model's input on the device and the
    probabilities upsampled back to the frame's size. Raises ValueError (CheckpointError for a
    missing or unfit checkpoint) with a one-line message.
    """

    def __init__(self, checkpoint: Optional[str | Path] = None, model: str | nn.Module = "autosam",
                 device: str | torch.device = "auto", precision: str = "auto", batch_size: Optional[int] = None,
                 sam_backend: Optional[str] = None, sam_checkpoint: Optional[str | Path] = None,
                 tile: Optional[int] = None, backend: str = "auto", box_refinement: Optional[bool] = None,
                 flip_tta: Optional[bool] = None, embedding_prompt: Optional[bool] = None) -> None:
        self.device = resolve_device(str(device))
        self.precision = resolve_precision(precision, self.device)
        autocast_dtype(self.precision, self.device)  # an unknown or impossible precision fails before loading
        if backend != "auto":  # likewise a backend that is not installed or cannot run here
            check_backend(backend, self.device, backend_precision(backend, self.precision, precision))
        check_batch_size(batch_size)
        if isinstance(model, nn.Module):
            loading = (checkpoint, sam_backend, sam_checkpoint, box_refinement, flip_tta, embedding_prompt)
            if any(setting is not None for setting in loading):
                raise ValueError("a built model is used as is: give checkpoint, sam_backend, sam_checkpoint, "
                                 "box_refinement, flip_tta and embedding_prompt only with model='autosam', 'light' "
                                 "or 'head'")
            network = model
        else:
            network = load_model(checkpoint, model, sam_backend, sam_checkpoint, box_refinement, flip_tta,
                                 embedding_prompt)
        self.batch_size = batch_size or default_batch_size(network, self.device)
        self.engine = build_engine(network, self.device, self.precision, precision, backend, self.batch_size, tile)
        self.model = self.engine.model
        self.class_names: Tuple[str, ...] = tuple(getattr(self.model, "class_names", ()))
        self.backend = self.engine.backend
        self.precision = self.engine.precision

    def __repr__(self) -> str:
        return (f"Segmenter(model={type(self.model).__name__}, device={self.device}, backend={self.backend}, "
                f"precision={self.precision}, batch_size={self.batch_size})")

    def predict(self, frames, batch_size: Optional[int] = None) -> np.ndarray | List[np.ndarray]:
        """Probability maps of independent frames (no smoothing across them).

        frames: uint8 RGB, numpy or torch: (N, H, W, 3) -> float32 (N, H, W) in [0, 1]; one frame
          (H, W, 3) -> (H, W); a list of (H, W, 3) frames of any sizes -> a list of (H, W) maps, each
          at its frame's size.
        batch_size: frames per model call (default: the Segmenter's); results do not depend on it
          beyond rounding.
        """
        batch_size = check_batch_size(batch_size) or self.batch_size
        if isinstance(frames, (list, tuple)):
            images = as_frame_list(frames)
            maps: List[np.ndarray] = []
            for start in range(0, len(images), batch_size):
                maps.extend(self._probabilities(images[start:start + batch_size]))
            return maps
        batch, single = as_frame_batch(frames)
        chunks = [self._probabilities(batch[start:start + batch_size]) for start in range(0, len(batch), batch_size)]
        probabilities = np.concatenate(chunks) if chunks else np.empty(tuple(batch.shape[:3]), np.float32)
        return probabilities[0] if single else probabilities

    def segment_video(self, video: str | Path | Clip, smooth: int = 0, batch_size: Optional[int] = None,
                      decoder: str = "av") -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """Stream a video file or a frame folder through the model, yielding as it goes.

        video: a video file (mp4, avi, mov, mkv, ...), a folder of frames (natural order) or a CVC clip
          folder (``<clip>/frames``); what ``vps-segment`` takes for one clip. It is opened now, so a
          missing or unreadable input raises here, before iterating.
        smooth: exponential moving average of the probabilities over ~N frames (0: off).
        decoder: ``av`` (PyAV, memory flat whatever the length) or ``decord``.

        Yields (index, frame, probabilities): the 0-based frame index, the (H, W, 3) uint8 RGB frame
        and its (H, W) float32 probabilities in [0, 1]. Frames are decoded ahead in a background
        thread while the model runs on batches of ``batch_size``.
        """
        return frames_of(self.segment_batches(open_clip(video, decoder), smooth, batch_size))

    def segment_batches(self, source: FrameSource, smooth: int = 0,
                        batch_size: Optional[int] = None) -> Iterator[SegmentedBatch]:
        """The batch-level form of ``segment_video`` (what ``vps-segment`` writes from): an opened
        ``vps.video`` source (``open_clip``, ``open_source``) -> its frames in ``SegmentedBatch``es, with
        their names and timestamps. A stills source (``Clip`` kind ``stills``) gives lists of any sizes."""
        batch_size = check_batch_size(batch_size) or self.batch_size
        stills = source.clip.kind == "stills"
        if smooth < 0:
            raise ValueError(f"smooth must be 0 (off) or a number of frames, got {smooth}")
        if stills and smooth > 1:
            raise ValueError("smoothing works across the frames of a video; stills are independent images")
        return self._stream(source, batch_size, ExponentialSmoother(smooth))

    def _stream(self, source: FrameSource, batch_size: int, smoother: ExponentialSmoother) -> Iterator[SegmentedBatch]:
        stills = source.clip.kind == "stills"
        first_index = 0
        with Prefetcher(source, batch_size, pin_memory=self.device.type == "cuda", stack=not stills) as reader:
            for batch in reader:
                frames = [f.numpy() for f in batch.frames] if stills else batch.frames.numpy()
                yield SegmentedBatch(first_index, batch.names, batch.pts, frames,
                                     self._probabilities(batch.frames, smoother))
                first_index += len(batch.names)

    @torch.inference_mode()
    def _probabilities(self, frames: torch.Tensor | List[torch.Tensor],
                       smoother: Optional[ExponentialSmoother] = None) -> np.ndarray | List[np.ndarray]:
        """B x H x W x 3 uint8 -> B x H x W float32 (smoothed by ``smoother`` when given); a list of
        H x W x 3 frames of any sizes -> a list of H x W maps. On the CPU."""
        if isinstance(frames, torch.Tensor):
            probabilities = self.engine.probabilities(frames)
            if smoother is not None:
                probabilities = smoother(probabilities)
            return probabilities.cpu().numpy()
        return [p.cpu().numpy() for p in self.engine.still_probabilities(frames)]


def build_engine(network: nn.Module, device: torch.device, precision: str, requested_precision: str,
                 backend: str, batch_size: int, tile: Optional[int] = None) -> SegmentationEngine:
    """The engine of ``backend``, built and compiled for ``batch_size``. ``auto`` tries
    ``auto_candidates`` in order: one that does not fit the model is skipped, one that fails to build
    is skipped with a one-line warning; eager, last, always works. A named backend that cannot run or
    fails to build is a BackendError."""
    names = auto_candidates(device) if backend == "auto" else (backend,)
    for name in names:
        run_precision = backend_precision(name, precision, requested_precision)
        try:
            engine = SegmentationEngine(network, device, run_precision, tile=tile, backend=name)
        except BackendError:
            if backend == "auto" and name != "eager":
                continue
            raise
        try:
            engine.prepare(batch_size)
        except Exception as error:  # export or compilation: many error types from many packages
            reason = build_failure(error)
            if backend != "auto" or name == "eager":
                raise BackendError(f"--backend {name} failed to build the model: {reason}") from error
            warnings.warn(f"backend {name} failed to build the model ({reason}); trying the next one")
            continue
        return engine
    raise BackendError("no backend could run the model")  # unreachable: eager is in every candidate list


def check_batch_size(batch_size: Optional[int]) -> Optional[int]:
    """``batch_size`` as given (None: the default), or a ValueError below 1."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


def frames_of(batches: Iterator[SegmentedBatch]) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """Segmented batches -> (index, frame, probabilities) for each of their frames, in order."""
    for batch in batches:
        for offset, (frame, probabilities) in enumerate(zip(batch.frames, batch.probabilities)):
            yield batch.first_index + offset, frame, probabilities
