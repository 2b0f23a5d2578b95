"""Inference backends for the frozen network: torch eager, or the model exported and run by OpenVINO,
ONNX Runtime or ``torch.compile``.

A backend other than eager runs ``model.low_res_logits`` on frames already resized to the model's
fixed input (B x 3 x S x S floats in [0, 1] -> B x 1 x 256 x 256 float32 logits); the engine does the
rest (resize, upsampling, sigmoid, smoothing) in torch as before. The exported backends compile the
network for a fixed batch; a smaller batch is padded, a larger one compiles once more.

Start-up is cached under ``cache_root()``: the ONNX file (keyed by a hash of the weights and the
versions of vps, torch and the exporter settings), and OpenVINO's compiled blobs (its ``CACHE_DIR``).
See docs/segment.md, "Backends", for the measurements behind ``AUTO_ORDER``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class BackendSpec:
    """What a backend needs and runs.

    package: the Python package it imports (None: torch alone).
    extra: the pip extra that installs it (``pip install 'vps[EXTRA]'``).
    precisions: the precisions it runs, the first being what ``auto`` falls back to.
    devices: the torch device types it runs on.
    """

    name: str
    package: Optional[str]
    extra: Optional[str]
    precisions: Tuple[str, ...]
    devices: Tuple[str, ...]


BACKENDS: Dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("eager", None, None, ("fp32", "bf16", "fp16"), ("cpu", "cuda")),
    BackendSpec("openvino", "openvino", "openvino", ("fp32", "bf16"), ("cpu",)),
    BackendSpec("onnx", "onnxruntime", "onnx", ("fp32",), ("cpu",)),
    BackendSpec("compile", None, None, ("fp32", "bf16", "fp16"), ("cpu", "cuda")),
)}
BACKEND_CHOICES = ("auto", *BACKENDS)
# ``auto`` takes the first of these that is installed, runs on the device and the model, and builds;
# eager always does. Fastest first, as measured by scripts/bench_segment.py --only backends.
# torch.compile is never picked by auto: its start-up takes minutes on a CPU.
AUTO_ORDER = ("openvino", "eager")

ONNX_OPSET = 17
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


class BackendError(ValueError):
    """A backend that is not installed, does not fit the model, device or precision, or failed to build."""


def cache_root() -> Path:
    """Where exported models are cached: $VPS_CACHE_DIR, else $XDG_CACHE_HOME/vps, else ~/.cache/vps."""
    if os.environ.get("VPS_CACHE_DIR"):
        return Path(os.environ["VPS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vps"


def is_installed(name: str) -> bool:
    package = BACKENDS[name].package
    return package is None or importlib.util.find_spec(package) is not None


def check_backend(name: str, device: torch.device, precision: str, option: str = "--backend") -> None:
    """A BackendError with a one-line reason when backend ``name`` cannot run on ``device`` in ``precision``;
    ``option`` is how the user chose it (a CLI flag or a config key)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; expected one of {', '.join(BACKEND_CHOICES)}")
    spec = BACKENDS[name]
    if not is_installed(name):
        raise BackendError(f"{option} {name}: the {spec.package} package is not installed; "
                           f"pip install 'vps[{spec.extra}]' (or use {option} eager)")
    if device.type not in spec.devices:
        raise BackendError(f"{option} {name} runs on {' or '.join(spec.devices)}, not {device.type}")
    if precision not in spec.precisions:
        raise BackendError(f"{option} {name} runs {' or '.join(spec.precisions)}, not {precision}")


def check_input_size(name: str, input_size: Optional[int]) -> None:
    """Backends other than eager run the model on frames resized once to its fixed input size."""
    if name != "eager" and input_size is None:
        raise BackendError(f"--backend {name} needs a model whose parts share one input size (LiteMedSAM "
                           "AutoSAM or the light model); use --backend eager")


def backend_precision(name: str, precision: str, requested: str) -> str:
    """The precision backend ``name`` runs: ``precision`` (resolved), or, when the user asked for
    ``auto`` and the backend cannot run it, the backend's own (ONNX Runtime: fp32)."""
    spec = BACKENDS.get(name)
    if spec is not None and requested == "auto" and precision not in spec.precisions:
        return spec.precisions[0]
    return precision


def auto_candidates(device: torch.device) -> Tuple[str, ...]:
    """The backends ``auto`` tries on ``device``, in order (eager last, always)."""
    return tuple(name for name in AUTO_ORDER if device.type in BACKENDS[name].devices and is_installed(name))


# ---- export ------------------------------------------------------------------------------------


def refines_with_boxes(model: nn.Module) -> bool:
    """AutoSAM with box refinement: its second pass needs connected components (scipy), which no exported graph
    holds, so the backends run its first pass and ``RefiningRunner`` the rest in torch."""
    return bool(getattr(model, "box_refinement", False))


class LowResLogits(nn.Module):
    """The network as one function of the resized frames, for export: ``model.low_res_logits``, or for a model that
    refines with boxes its ``first_pass`` (two outputs: logits and image embeddings)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.first_pass(images) if refines_with_boxes(self.model) else self.model.low_res_logits(images)


def weights_hash(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_cache_path(model: nn.Module, batch: int, input_size: int, cache_dir: Path,
                    weights: Optional[nn.Module] = None) -> Path:
    """The cached ONNX file of ``model`` at this batch and input size (the name holds every key). ``weights``: the
    part of ``model`` whose weights the graph holds, when that is not all of it (default ``model``)."""
    import vps

    hashed = weights_hash(weights if weights is not None else model)
    key = hashlib.sha256(f"{hashed} vps {vps.__version__} torch {torch.__version__} opset {ONNX_OPSET}".encode()
                         ).hexdigest()[:20]
    part = ("-first-pass" if refines_with_boxes(model) else "") + ("-flip-tta" if getattr(model, "flip_tta", False) else "")
    return cache_dir / "onnx" / f"{type(model).__name__}{part}-b{batch}-{input_size}px-{key}.onnx"


def export_onnx(model: nn.Module, batch: int, input_size: int, cache_dir: Path) -> Path:
    """The model's ``low_res_logits`` as an ONNX file for a fixed batch, exported once and cached."""
    path = onnx_cache_path(model, batch, input_size, cache_dir)
    outputs = ["logits", "embeddings"] if refines_with_boxes(model) else ["logits"]
    return _export_cached(path, LowResLogits(model), (torch.rand(batch, 3, input_size, input_size),), ["images"],
                          outputs)


class BoxDecoder(nn.Module):
    """SAM's decoding from one box prompt per image, for export (the second pass of AutoSAM's box refinement):
    B x 256 x 64 x 64 embeddings, B x 4 boxes -> B x 1 x 256 x 256 logits."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.sam.decode_with_prompts(image_embeddings, boxes=boxes)


def box_decoder_cache_path(sam: nn.Module, cache_dir: Path) -> Path:
    """The cached ONNX file of SAM's box decoder, keyed by the weights the graph holds: the prompt encoder and the
    mask decoder (the image encoder, most of SAM, is not hashed)."""
    decoding = nn.ModuleList([sam.prompt_encoder, sam.mask_decoder])
    return onnx_cache_path(BoxDecoder(sam), 1, sam.image_size, cache_dir, weights=decoding)


class ImageEncoder(nn.Module):
    """SAM's image encoding as one function, for export: B x 3 x S x S images in [0, 1] -> B x 256 x 64 x 64
    embeddings (``sam.encode``: resize to SAM's input, normalise, encode)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.sam.encode(images)


def export_image_encoder(sam: nn.Module, batch: int, input_size: int, cache_dir: Path) -> Path:
    """SAM's ``ImageEncoder`` as an ONNX file for a fixed batch and input size, exported once and cached (keyed by
    the image encoder's weights)."""
    path = onnx_cache_path(ImageEncoder(sam), batch, input_size, cache_dir, weights=sam.image_encoder)
    return _export_cached(path, ImageEncoder(sam), (torch.rand(batch, 3, input_size, input_size),), ["images"],
                          ["embeddings"])


def export_box_decoder(sam: nn.Module, cache_dir: Path) -> Path:
    """SAM's box decoder (``BoxDecoder``) for one box as an ONNX file, exported once and cached."""
    path = box_decoder_cache_path(sam, cache_dir)
    examples = (torch.rand(1, *sam.embedding_shape), torch.tensor([[10.0, 20.0, 30.0, 40.0]]))
    return _export_cached(path, BoxDecoder(sam), examples, ["embeddings", "boxes"], ["logits"])


def _export_cached(path: Path, module: nn.Module, examples: Tuple[torch.Tensor, ...], inputs: List[str],
                   outputs: List[str]) -> Path:
    """``module`` exported to ONNX at ``path`` with fixed input shapes, unless the file exists."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        # fp32 whatever the caller's autocast (a batch of a new size is built inside the engine's)
        with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
            warnings.simplefilter("ignore")  # tracer warnings about shape checks, fixed by the static shape
            torch.onnx.export(module.eval(), examples, str(partial), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=inputs, output_names=outputs)
        os.replace(partial, path)  # atomic: a concurrent run never reads a half-written file
    finally:
        partial.unlink(missing_ok=True)
    return path


# ---- runners -----------------------------------------------------------------------------------

Session = Callable[..., Sequence[np.ndarray]]  # the graph's input arrays -> every output of the graph


class StaticBatchRunner:
    """Runs sessions compiled for a fixed batch on batches of any size.

    ``build(batch)`` returns a session for that batch (float32 NCHW array -> the graph's output arrays). A batch is
    run by the smallest session that holds it, padded with zeros; a larger batch builds a session. Returns the
    one output as a tensor, or a tuple of tensors for a graph with several.
    """

    def __init__(self, build: Callable[[int], Session]) -> None:
        self.build = build
        self.sessions: Dict[int, Session] = {}

    def prepare(self, batch: int) -> None:
        """Build the session for ``batch`` now (start-up cost and errors up front)."""
        if batch not in self.sessions:
            self.sessions[batch] = self.build(batch)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count = len(images)
        batch = min((size for size in self.sessions if size >= count), default=count)
        self.prepare(batch)
        array = images.detach().float().cpu().contiguous().numpy()
        if count < batch:
            array = np.concatenate([array, np.zeros((batch - count, *array.shape[1:]), array.dtype)])
        outputs = tuple(torch.from_numpy(np.array(output[:count], dtype=np.float32))
                        for output in self.sessions[batch](array))
        return outputs[0] if len(outputs) == 1 else outputs


class RefiningRunner:
    """A runner of AutoSAM's first pass (logits, embeddings) followed by its box refinement: the boxes in torch, their
    decoding by ``build_box_session()`` (a session of ``BoxDecoder`` for one box, built at ``prepare``), or by
    torch when that is None."""

    def __init__(self, runner, model: nn.Module, build_box_session: Optional[Callable[[], Session]] = None) -> None:
        self.runner = runner
        self.model = model
        self.build_box_session = build_box_session
        self.box_session: Optional[Session] = None

    def prepare(self, batch: int) -> None:
        self.runner.prepare(batch)
        self._prepare_boxes()

    def _prepare_boxes(self) -> None:
        if self.build_box_session is not None and self.box_session is None:
            self.box_session = self.build_box_session()

    def decode_boxes(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """N x 256 x 64 x 64 embeddings, N x 4 boxes -> N x 1 x 256 x 256 logits, one box per session call."""
        embeddings = image_embeddings.detach().float().cpu().numpy()
        corners = boxes.detach().float().cpu().numpy()
        logits = [self.box_session(embeddings[i:i + 1], corners[i:i + 1])[0] for i in range(len(corners))]
        return torch.from_numpy(np.concatenate(logits).astype(np.float32)).to(image_embeddings.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits, embeddings = self.runner(images)
        device = self.model.sam.pixel_mean.device
        self._prepare_boxes()
        decode = self.decode_boxes if self.box_session is not None else None
        return self.model.refine_with_boxes(embeddings.to(device), logits.to(device), decode)


@functools.lru_cache(maxsize=None)
def _openvino_core(process_id: int):
    """One OpenVINO Core per process (keyed by pid: a forked child makes its own): a second Core in one process can
    crash it (ultralytics/ultralytics#25864), here at the exit of a process that had also forked workers."""
    import openvino

    return openvino.Core()


def openvino_session(onnx_file: Path, precision: str, threads: int, cache_dir: Path) -> Session:
    """An OpenVINO CPU session of an ONNX file: bf16 (AMX/AVX512-BF16) or f32 inference precision,
    latency hint, ``threads`` threads; compiled blobs cached in ``cache_dir``."""
    compiled = _openvino_core(os.getpid()).compile_model(str(onnx_file), "CPU", {
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "CACHE_DIR": str(cache_dir),
    })
    request = compiled.create_infer_request()

    def run(*arrays: np.ndarray) -> List[np.ndarray]:
        results = request.infer(dict(enumerate(arrays)))
        return [results[output] for output in compiled.outputs]

    return run


def onnxruntime_session(onnx_file: Path, threads: int) -> Session:
    """An ONNX Runtime CPU session of an ONNX file (fp32), ``threads`` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    names = [given.name for given in session.get_inputs()]
    return lambda *arrays: session.run(None, dict(zip(names, arrays)))


def exported_session(name: str, onnx_file: Path, precision: str, threads: int, cache_dir: Path) -> Session:
    """A session of the exported backend ``name`` (openvino or onnx) on an ONNX file."""
    if name == "openvino":
        return openvino_session(onnx_file, precision, threads, cache_dir / "openvino")
    if name == "onnx":
        return onnxruntime_session(onnx_file, threads)
    raise BackendError(f"no runner for backend '{name}'")


def build_failure(error: BaseException) -> str:
    """The one-line reason of an export or compilation failure (many error types from many packages)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class CompiledRunner:
    """``torch.compile`` (inductor, weights frozen) of ``model.low_res_logits`` (of ``first_pass`` for a model that
    refines with boxes), under the engine's autocast."""

    def __init__(self, model: nn.Module) -> None:
        function = model.first_pass if refines_with_boxes(model) else model.low_res_logits
        self.function = torch.compile(function, options={"freezing": True})

    def prepare(self, batch: int) -> None:
        """Nothing up front: compilation happens at the first batch (minutes on a CPU)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.function(images)


def build_runner(name: str, model: nn.Module, precision: str, input_size: int,
                 threads: Optional[int] = None, cache_dir: Optional[Path] = None):
    """The runner of backend ``name`` (not eager) for ``model`` (eval mode, on the CPU for the exported
    backends): callable on B x 3 x S x S images, with ``prepare(batch)``. Checked by ``check_backend``."""
    threads = threads or torch.get_num_threads()
    cache_dir = cache_dir or cache_root()
    runner = _first_runner(name, model, precision, input_size, threads, cache_dir)
    if not refines_with_boxes(model):
        return runner
    if name == "compile":
        return RefiningRunner(runner, model)

    def build_box_session() -> Session:
        return exported_session(name, export_box_decoder(model.sam, cache_dir), precision, threads, cache_dir)

    return RefiningRunner(runner, model, build_box_session)


def _first_runner(name: str, model: nn.Module, precision: str, input_size: int, threads: int, cache_dir: Path):
    """The runner of the exported (or compiled) part: ``LowResLogits`` of the model."""
    if name == "compile":
        return CompiledRunner(model)
    if name not in ("openvino", "onnx"):
        raise BackendError(f"no runner for backend '{name}'")

    def build(batch: int) -> Session:
        return exported_session(name, export_onnx(model, batch, input_size, cache_dir), precision, threads, cache_dir)

    return StaticBatchRunner(build)


def image_encoder(sam: nn.Module, device: torch.device, backend: str, precision: str, batch: int,
                  threads: Optional[int] = None, cache_dir: Optional[Path] = None,
                  option: str = "--backend") -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that computes SAM's image embeddings (B x 3 x H x W in [0, 1] -> B x 256 x 64 x 64), for the
    training's embedding cache.

    ``eager`` is ``sam.encode`` (the caller's autocast applies); ``compile`` is ``torch.compile`` of it; an exported
    backend runs ``ImageEncoder`` compiled for ``batch`` at SAM's input size (images of another size are resized in
    torch first, as ``sam.preprocess`` does), in ``precision`` where it runs it, else in its own (ONNX Runtime:
    fp32). ``auto`` tries ``auto_candidates(device)`` in order and skips, with a one-line warning, one that fails to
    build. Built here, so the start-up cost and errors come up front; a named backend that cannot run is a
    BackendError naming ``option``.
    """
    from vps.inference import resize_images  # vps.inference builds on this module

    names = auto_candidates(device) if backend == "auto" else (backend,)
    cache_dir = cache_dir or cache_root()
    threads = threads or torch.get_num_threads()
    size = int(sam.image_size)
    for name in names:
        run_precision = backend_precision(name, precision, "auto")
        check_backend(name, device, run_precision, option)
        if name == "eager":
            return sam.encode
        if name == "compile":
            return torch.compile(ImageEncoder(sam).eval(), options={"freezing": True})

        def build(count: int, name: str = name) -> Session:
            return exported_session(name, export_image_encoder(sam, count, size, cache_dir), run_precision, threads,
                                    cache_dir)

        runner = StaticBatchRunner(build)
        try:
            runner.prepare(batch)
        except Exception as error:  # export or compilation: many error types from many packages
            reason = build_failure(error)
            if backend != "auto":
                raise BackendError(f"{option} {name} failed to build SAM's image encoder: {reason}") from error
            warnings.warn(f"backend {name} failed to build SAM's image encoder ({reason}); trying the next one")
            continue

        def encode(images: torch.Tensor, runner: StaticBatchRunner = runner) -> torch.Tensor:
            return runner(resize_images(images.float(), size))

        return encode
    raise BackendError("no backend could run SAM's image encoder")  # unreachable: eager is in every candidate list
