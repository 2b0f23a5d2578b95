"""Batched inference: uint8 frames -> device -> autocast -> mask logits -> 8-bit probability maps.

The engine resizes frames once on the device to the model's input size when every part of the
model uses the same one (LiteMedSAM and g both take 256 x 256), instead of letting SAM and g each
resize the full frame; the logits are upsampled back to the frame size on the device.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vps.backends import build_runner, check_backend, check_input_size
from vps.hardware import cpu_has_native_bf16
from vps.modeling import AutoSAM, LightModel, PromptFreeSam
from vps.tiling import tiled_logits

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: cuda:LOCAL_RANK when CUDA is present, else cpu. ``cuda`` also means cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """The one rule for ``auto``, shared by inference and training.

    ``auto``: bf16 autocast on CUDA and on CPUs that compute bf16 natively (AVX512-BF16 or AMX,
    from the CPU flags), where it is 1.7x to 2.5x faster than fp32 for AutoSAM; fp32 on other CPUs,
    which emulate bf16 slowly. Any other name is returned as given (checked by ``autocast_dtype``).
    """
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``fp32|bf16|fp16`` (None = no autocast); fp16 is CUDA only."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    return PRECISIONS[precision]


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold TinyViT's ``Conv2d_BN`` pairs (in eval mode) into single convolutions, in place.

    Returns the number of pairs fused. The result equals the unfused model up to rounding.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv2d_BN" and hasattr(child, "fuse"):
                setattr(parent, name, child.fuse())
                count += 1
    return count


def optimize_for_inference(model: nn.Module, device: torch.device, channels_last: bool = True,
                           fuse: bool = True) -> nn.Module:
    """Eval mode, on ``device``, Conv+BN folded, channels-last weights (faster convolutions on CPU and GPU)."""
    model = model.eval()
    if fuse:
        fuse_conv_bn(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_input_size(model: nn.Module) -> Optional[int]:
    """The square side every part of the model resizes its input to, or None when they differ."""
    if isinstance(model, LightModel):
        return model.prompt_generator.input_size
    if isinstance(model, PromptFreeSam):
        return model.sam.image_size
    if isinstance(model, AutoSAM) and model.sam.image_size == model.prompt_generator.input_size:
        return model.sam.image_size
    return None


def stills_input_size(model: nn.Module) -> Optional[int]:
    """The square side stills of any size are resized to, so that they share a batch: the model's
    input size, or SAM's (the larger) where SAM and g differ."""
    size = model_input_size(model)
    if size is None and isinstance(model, AutoSAM):
        size = model.sam.image_size
    return size


def resize_images(images: torch.Tensor, side: int) -> torch.Tensor:
    """B x 3 x H x W float (or uint8 on a CPU) -> B x 3 x side x side (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def probabilities_to_uint8(probabilities: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] -> round(255 p) as uint8 (never normalised per frame), same shape."""
    return (probabilities * 255).round_().to(torch.uint8)


def threshold_uint8(threshold: float) -> int:
    """The 8-bit level a probability map is binarised at: mask = map >= this (0.5 -> 128).

    Binary masks are derived from the 8-bit maps so that a PNG map thresholded here gives exactly
    the mask written to the mask video.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return max(1, math.ceil(threshold * 255))


class ExponentialSmoother:
    """Causal exponential moving average of probability maps across frames.

    ``span`` N gives alpha = 2 / (N + 1): p'_t = alpha p_t + (1 - alpha) p'_{t-1}. Flicker drops,
    and a mask follows motion with a lag of about (N - 1) / 2 frames. ``span`` <= 1 is a no-op.
    """

    def __init__(self, span: int) -> None:
        self.alpha = 2.0 / (span + 1) if span > 1 else 1.0
        self.state: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.state = None

    def __call__(self, probabilities: torch.Tensor) -> torch.Tensor:
        """B x H x W probabilities (consecutive frames) -> smoothed, same shape."""
        if self.alpha >= 1.0:
            return probabilities
        out = torch.empty_like(probabilities)
        for i, frame in enumerate(probabilities):
            self.state = frame if self.state is None else torch.lerp(self.state, frame, self.alpha)
            out[i] = self.state
        return out


class SegmentationEngine:
    """Runs a model on batches of uint8 frames and returns 8-bit probability maps.

    Arguments:
      model: AutoSAM, LightModel, PromptFreeSam (K classes: maps get a class axis after the batch axis), or any
        module mapping B x 3 x H x W in [0, 1] to B x 1 x H x W logits.
      device: where the model runs.
      precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 on CUDA only).
      smooth: span of the exponential smoothing across frames (0 or 1: off).
      optimize: fold Conv+BN and use channels-last (see ``optimize_for_inference``); modifies ``model``.
      resize_on_device: resize frames once to the model's input size before the model (always, with a
        backend other than eager).
      tile: stills larger than this side (pixels) are segmented in overlapping tiles (vps/tiling.py); None: whole.
      backend: ``eager`` (torch), ``openvino``, ``onnx`` or ``compile`` (see ``vps.backends``); the others
        run the model's fixed-size part and need a model with one input size.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 smooth: int = 0, optimize: bool = True, resize_on_device: bool = True,
                 tile: Optional[int] = None, backend: str = "eager") -> None:
        self.device = torch.device(device)
        self.dtype = autocast_dtype(precision, self.device)
        check_backend(backend, self.device, precision)
        check_input_size(backend, model_input_size(model))
        self.backend = backend
        self.precision = precision
        self.model = optimize_for_inference(model, self.device, channels_last=optimize, fuse=optimize)
        self.runner = None if backend == "eager" else build_runner(backend, self.model, precision,
                                                                   model_input_size(model))
        self.channels_last = optimize and self.runner is None
        self.input_size = model_input_size(model) if resize_on_device or self.runner is not None else None
        self.stills_size = stills_input_size(model)
        self.smoother = ExponentialSmoother(smooth)
        self.tile = tile

    def reset(self) -> None:
        """Forget the smoothing state (call between clips)."""
        self.smoother.reset()

    def prepare(self, batch_size: int) -> None:
        """Export and compile the backend's model for ``batch_size`` frames now (eager: nothing), so that
        its start-up cost and errors come before the first frame."""
        if self.runner is not None:
            self.runner.prepare(batch_size)

    def images(self, frames: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 (CPU, pinned on CUDA) -> B x 3 x h x w float in [0, 1] on the device.

        On a CPU the frames are resized while still uint8: torch's vectorised antialiased path, about 4x the float
        one, within one 8-bit level of it (training keeps its resized images as uint8 too)."""
        images = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        resize_uint8 = self.device.type == "cpu" and images.dtype == torch.uint8
        if self.input_size is not None and resize_uint8:
            images = resize_images(images, self.input_size)
        images = images.float().div_(255)
        if self.input_size is not None and not resize_uint8:
            images = resize_images(images, self.input_size)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _forward(self, images: torch.Tensor, size: Optional[tuple]) -> torch.Tensor:
        """B x 3 x h x w images -> B x K x h' x w' float32 logits (``size`` when given, else the model's own)."""
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            if self.runner is not None:
                logits = self.runner(images)  # low-resolution; ``logits`` upsamples
            elif isinstance(self.model, (AutoSAM, LightModel, PromptFreeSam)):
                logits = self.model.low_res_logits(images) if size is None else self.model(images, output_size=size)
            else:
                logits = self.model(images)
        return logits.float()

    @torch.inference_mode()
    def logits(self, frames: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 -> B x H x W float32 logits at the frames' size (B x K x H x W for K > 1 classes),
        on the device."""
        size = tuple(frames.shape[1:3])
        logits = self._forward(self.images(frames), size)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[:, 0] if logits.shape[1] == 1 else logits

    @torch.inference_mode()
    def probabilities(self, frames: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 -> B x H x W float32 probabilities (B x K x H x W for K > 1 classes; sigmoid of the
        logits, not smoothed), on the device."""
        return torch.sigmoid(self.logits(frames))

    @torch.inference_mode()
    def still_probabilities(self, frames: List[torch.Tensor]) -> List[torch.Tensor]:
        """H x W x 3 uint8 images of any sizes -> one H x W float32 probability map each (K x H x W for K > 1
        classes), on the device.

        Every image is resized to the model's fixed input on the device, so images of different
        sizes share one batch; each map is upsampled back to its own image's size. With ``tile``, each
        image is segmented in overlapping tiles instead (``tiled_still``). No smoothing: stills are
        independent images.
        """
        if self.stills_size is None:
            raise ValueError("stills need a model with a fixed input size (AutoSAM, the light model or a head)")
        if self.tile is not None:
            return [self.tiled_still(frame) for frame in frames]
        images = torch.cat([resize_images(self.images(frame[None]), self.stills_size) for frame in frames])
        logits = self._forward(images, None)
        maps = []
        for logit, frame in zip(logits, frames):
            size = tuple(frame.shape[:2])
            logit = F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False)[0]
            maps.append(torch.sigmoid(logit[0] if len(logit) == 1 else logit))
        return maps

    @torch.inference_mode()
    def tiled_still(self, frame: torch.Tensor) -> torch.Tensor:
        """H x W x 3 uint8 -> H x W float32 probability map (K x H x W for K > 1 classes) on the device, segmented
        in overlapping ``tile`` x ``tile`` windows at full resolution, each resized to the model's input
        (vps/tiling.py)."""
        image = frame.to(self.device).permute(2, 0, 1).float().div_(255)
        logits = tiled_logits(lambda windows: self._forward(resize_images(windows, self.stills_size), None),
                              image, self.tile)[0]
        return torch.sigmoid(logits[0] if len(logits) == 1 else logits)

    @torch.inference_mode()
    def stills(self, frames: List[torch.Tensor]) -> List[torch.Tensor]:
        """H x W x 3 uint8 images of any sizes -> one H x W uint8 probability map each (K x H x W for K > 1
        classes), on the CPU (``still_probabilities`` as 8-bit maps)."""
        return [probabilities_to_uint8(p).cpu() for p in self.still_probabilities(frames)]

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 -> B x H x W uint8 probability maps (sigmoid x 255, smoothed), on the CPU."""
        return probabilities_to_uint8(self.smoother(self.probabilities(frames))).cpu()


@torch.no_grad()
def per_frame_loop(model: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Reference: the model on one frame at a time at native size, fp32, no engine tricks.

    frames: N x H x W x 3 uint8. Returns N x H x W uint8 probability maps.
    """
    outputs = []
    for frame in frames:
        image = frame.permute(2, 0, 1)[None].float() / 255
        outputs.append(probabilities_to_uint8(torch.sigmoid(model(image)[0, 0])))
    return torch.stack(outputs)
