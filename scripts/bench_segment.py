"""Benchmark of ``vps-segment``: the engine against a plain per-frame loop, side by side in one run.

    python scripts/bench_segment.py                      # everything, CPU (several minutes)
    python scripts/bench_segment.py --only engine light  # a subset
    python scripts/bench_segment.py --device cuda --sam vit_b --frames 512 --batch-sizes 32 64

Measures (same clip, model and precision on both sides of each ratio):
  baseline `vps-segment` with default options (built-in model, default backend and precision), the whole
           process as a user runs it, model start-up included, with an empty and with a filled export
           cache / a plain fp32 per-frame loop of LiteMedSAM's image encoder alone (decode every frame
           first, then the encoder on one 256 x 256 frame at a time), on --baseline-frames frames; and
           the defaults without AutoSAM's box refinement, without its flip TTA, and without its embedding
           prompt head (the cost of each)
  backends each backend (eager, OpenVINO, ONNX Runtime; torch.compile with --compile) on the built-in
           model: start-up (export + compile, then from the cache), model-only frames/s at the default
           batch, and its probabilities against eager fp32 on real frames (mean |dp|, Dice at 0.5)
  engine   end-to-end frames/s of the engine (decode in a thread, batches, writes) / the plain loop
           (decode every frame first, then the model on one frame at a time at native size);
           end-to-end / model-only frames/s (is decoding hidden behind compute?); the batch size sweep
  bf16     bf16 / fp32 model-only frames/s
  light    the light model (g + h) end to end, fp32 and bf16
  memory   peak RSS of the whole vps-segment process (the console script, default options, mask video
           and PNGs) on a 300- and a 3000-frame synthetic video, with each decoder (--decoders) and
           model (--memory-models; AutoSAM's 3000 frames take about an hour on a 2-core CPU)
Uses the real clip ../shared/data/cvc-clinicdb-video/<clip>/frames when present (looped to --frames
frames, 384 x 288), else a synthetic one. Without --checkpoint the model has random weights with the
default (not tiny) configuration. Everything is written in a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import vps  # noqa: F401
from vps.api import Segmenter, load_model
from vps.backends import BACKENDS, is_installed
from vps.cli.segment import Outputs, Totals, segment_clip
from vps.hardware import cpu_name
from vps.inference import SegmentationEngine, per_frame_loop, resize_images
from vps.modeling import (
    AutoSAM, build_prompt_generator, build_surrogate, checkpoint_metadata, load_model_from_checkpoint,
    save_checkpoint,
)
from vps.video import find_clips, open_source, quiet_decoders, write_video

SHARED_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cvc-clinicdb-video"
SIZE = (288, 384)  # H, W


def hardware() -> str:
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"nproc {os.cpu_count()}, {cpu}, torch threads {torch.get_num_threads()}{gpu}; "
            f"torch {torch.__version__}, python {platform.python_version()}; "
            f"load average {os.getloadavg()[0]:.1f} (shared machine)")


def synthetic_frames(count: int, height: int = SIZE[0], width: int = SIZE[1]):
    """A moving bright disc on a textured dark background, generated lazily."""
    yy, xx = np.mgrid[:height, :width]
    background = (20 + 10 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.uint8)
    for i in range(count):
        frame = np.repeat(background[..., None], 3, axis=2)
        cx, cy = width * (0.3 + 0.4 * np.sin(i / 20)), height * (0.5 + 0.2 * np.cos(i / 15))
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 < (height / 6) ** 2] = (220, 120, 100)
        yield frame


def real_frames(count: int):
    """Frames of the first CVC-ClinicDB clip, looped to ``count``; None when the data are absent."""
    import cv2

    folders = sorted(SHARED_CLIPS.glob("*/frames")) if SHARED_CLIPS.is_dir() else []
    if not folders:
        return None
    paths = sorted(folders[0].glob("*.png"))
    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    return (frames[i % len(frames)] for i in range(count)), f"CVC-ClinicDB clip {folders[0].parent.name}"


def make_clip(folder: Path, count: int) -> tuple:
    real = real_frames(count)
    frames, what = real if real else (synthetic_frames(count), "synthetic")
    path = write_video(folder / "clip.mp4", frames, fps=25, options={"crf": "18", "preset": "veryfast"})
    return path, f"{what}, {count} frames, {SIZE[1]}x{SIZE[0]}, H.264 mp4"


def random_checkpoint(path: Path, sam_backend: str) -> Path:
    torch.manual_seed(0)
    generator = build_prompt_generator(pretrained_backbone=False)
    meta = checkpoint_metadata({}, sam_backend, {"hidden_channels": 64})
    return save_checkpoint(path, meta, generator, build_surrogate())


def load(checkpoint: Path, model: str, sam: str):
    if model == "autosam" and sam != "litemedsam":
        from vps.modeling.build_sam import build_sam_vit

        torch.manual_seed(0)  # random SAM ViT weights: speed only
        light = load_model_from_checkpoint(checkpoint, "light")
        return AutoSAM(build_sam_vit(sam), light.prompt_generator).eval()
    return load_model_from_checkpoint(checkpoint, model)


def decoded_frames(video: Path) -> torch.Tensor:
    return torch.from_numpy(np.stack([f for _, f, _ in open_source(find_clips(video)[0])]))


def plain_loop_fps(model, video: Path, device: torch.device) -> float:
    """Decode every frame, then the model one frame at a time (fp32, native size)."""
    model = copy.deepcopy(model).to(device)
    start = time.perf_counter()
    frames = decoded_frames(video)
    decode_seconds = time.perf_counter() - start
    per_frame_loop(model, frames[:1].to(device))  # warm-up, not counted
    start = time.perf_counter()
    per_frame_loop(model, frames.to(device)).cpu()
    return len(frames) / (decode_seconds + time.perf_counter() - start)


def engine(model, device, precision: str, **kwargs) -> SegmentationEngine:
    return SegmentationEngine(copy.deepcopy(model), device, precision, **kwargs)


def warm(eng: SegmentationEngine, frames: torch.Tensor, batch: int) -> None:
    eng(frames[:batch])
    if len(frames) % batch:
        eng(frames[: len(frames) % batch])
    eng.reset()


def model_only_fps(eng: SegmentationEngine, frames: torch.Tensor, batch: int) -> float:
    if eng.device.type == "cuda":
        frames = frames.pin_memory()
    warm(eng, frames, batch)
    start = time.perf_counter()
    for i in range(0, len(frames), batch):
        eng(frames[i:i + batch])
    return len(frames) / (time.perf_counter() - start)


def end_to_end_fps(model, device, precision: str, video: Path, batch: int, out: Path, backend: str = "eager") -> float:
    """The vps-segment path (prefetching reader, Segmenter, mask video writer), model already loaded."""
    segmenter = Segmenter(model=copy.deepcopy(model), device=device, precision=precision, batch_size=batch,
                          backend=backend)
    segmenter.predict(decoded_frames(video)[:batch].numpy())  # warm-up, not counted
    args = Namespace(decoder="av", fps=25.0, threshold=0.5, overwrite=True, smooth=0, quiet=True)
    clip = find_clips(video)[0]
    start = time.perf_counter()
    segment_clip(clip, Outputs(mask=out / "masks.mp4"), segmenter, args, Totals())
    return decoded_count(video) / (time.perf_counter() - start)


def decoded_count(video: Path) -> int:
    return open_source(find_clips(video)[0]).info.num_frames


def vps_segment_command() -> list:
    """The ``vps-segment`` console script of this environment (what a user runs)."""
    script = Path(sys.executable).with_name("vps-segment")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vps.cli.segment"]


# Runs the command as a child of this small process and prints the child's peak RSS in KiB. The
# child's peak includes what it inherited before exec (a fork of a large benchmark process would
# count the benchmark's memory), hence the small intermediate process.
PEAK_RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)"
                    ".returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def peak_rss_mb(argv: list) -> float:
    """Peak resident memory of the whole ``vps-segment`` process (all threads, libraries, decoders), in MB."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *vps_segment_command(), *map(str, argv)],
                            check=True, stdout=subprocess.PIPE, text=True)
    return int(result.stdout.split()[-1]) / 1024


def memory(args: argparse.Namespace, checkpoint: Path, tmp: Path) -> None:
    """Peak RSS of vps-segment, default options (mask video + PNGs), short vs long video, per decoder and model."""
    videos = {count: write_video(tmp / f"long{count}.mp4", synthetic_frames(count), fps=25,
                                 options={"crf": "23", "preset": "ultrafast"}) for count in args.long_frames}
    for model in args.memory_models:
        for decoder in args.decoders:
            threads = f", --threads {args.memory_threads}" if args.memory_threads else ""
            print(f"peak RSS of the vps-segment process ({model} model, --decoder {decoder}{threads}, default "
                  "precision and batch, mask video + PNGs):")
            peaks = []
            for count, video in videos.items():
                start = time.perf_counter()
                peak = peak_rss_mb([video, "--out", tmp / "mask.mp4", "--png-dir", tmp / "png", "--model", model,
                                    "--checkpoint", checkpoint, "--decoder", decoder, "--device", args.device,
                                    "--quiet", "--overwrite",
                                    *(["--threads", args.memory_threads] if args.memory_threads else [])])
                peaks.append(peak)
                row(f"{count} frames", f"{peak:.0f} MB", f"{count / (time.perf_counter() - start):.1f} f/s "
                    "with process start-up")
            row("  growth", f"{peaks[-1] - peaks[0]:+.0f} MB", "target < 50 MB")


def plain_encoder_fps(video: Path) -> float:
    """Decode every frame, then LiteMedSAM's image encoder alone on one 256 x 256 frame at a time, fp32
    eager (the built-in model's encoder; resizing and normalising counted)."""
    sam = load_model().sam.eval()
    start = time.perf_counter()
    frames = decoded_frames(video)
    with torch.inference_mode():
        for frame in frames:
            image = resize_images(frame.permute(2, 0, 1)[None].float() / 255, sam.image_size)
            sam.image_encoder((image - sam.pixel_mean) / sam.pixel_std)
    return len(frames) / (time.perf_counter() - start)


def vps_segment_seconds(video: Path, out: Path, cache: Path, *options: str) -> float:
    """Wall time of the whole ``vps-segment`` process with default options and ``options`` (export cache in
    ``cache``)."""
    start = time.perf_counter()
    subprocess.run([*vps_segment_command(), str(video), "--out", str(out), "--overwrite", "--quiet", *options],
                   check=True, env={**os.environ, "VPS_CACHE_DIR": str(cache)})
    return time.perf_counter() - start


def baseline(args: argparse.Namespace, tmp: Path) -> None:
    """vps-segment defaults, whole process, against a plain fp32 per-frame loop of the encoder alone."""
    (tmp / "baseline").mkdir()
    video, what = make_clip(tmp / "baseline", args.baseline_frames)
    count = decoded_count(video)
    print(f"vps-segment defaults vs the plain encoder loop, clip: {what}")
    plain = plain_encoder_fps(video)
    row("plain fp32 per-frame loop, image encoder alone", f"{plain:.3f} f/s", "baseline")
    cache = tmp / "baseline" / "cache"
    for state in ("empty", "filled"):
        seconds = vps_segment_seconds(video, tmp / "baseline" / "masks.mp4", cache)
        row(f"vps-segment defaults, whole process, cache {state}", f"{count / seconds:.3f} f/s",
            f"{seconds:.0f} s for {count} frames; {count / seconds / plain:.2f}x the baseline (target 3x, goal 5x)")
    for what, option in (("the box refinement", "--no-box-refinement"), ("the flip TTA", "--no-flip-tta"),
                         ("the embedding prompt head", "--no-embedding-prompt")):
        without = vps_segment_seconds(video, tmp / "baseline" / "masks.mp4", cache, option)
        row(f"  the same without {what} ({option}), cache filled", f"{count / without:.3f} f/s",
            f"{without:.0f} s; its cost: the defaults take {seconds / without:.2f}x this time")


def backend_runs(args: argparse.Namespace) -> list:
    """(backend, precision) pairs to measure: eager in both, then each installed backend."""
    runs = [("eager", "fp32"), ("eager", "bf16")]
    for name in ("openvino", "onnx", "compile"):
        if (name != "compile" or args.compile) and is_installed(name):
            runs += [(name, precision) for precision in BACKENDS[name].precisions if precision != "fp16"]
    return runs


def agreement(reference: np.ndarray, probabilities: np.ndarray) -> str:
    """Mean |dp| over the frames (worst frame) and Dice of the masks at 0.5 (mean, worst frame)."""
    mean_abs = np.abs(reference - probabilities).mean(axis=(1, 2))
    a, b = reference >= 0.5, probabilities >= 0.5
    total = a.sum(axis=(1, 2)) + b.sum(axis=(1, 2))
    dice = np.where(total > 0, 2 * (a & b).sum(axis=(1, 2)) / np.maximum(total, 1), 1.0)
    return (f"mean |dp| {mean_abs.mean():.4f} (worst {mean_abs.max():.4f}), "
            f"Dice {dice.mean():.3f} (worst {dice.min():.3f})")


def backends(args: argparse.Namespace, tmp: Path) -> None:
    """Start-up, model-only speed and agreement with eager fp32 of each backend, built-in model."""
    real = real_frames(args.frames)
    frames, what = (np.stack(list(real[0])), real[1]) if real else (np.stack(list(synthetic_frames(args.frames))),
                                                                    "synthetic")
    print(f"backends, built-in model, {len(frames)} frames of {what}, model-only (frames in memory):")
    for model in args.backend_models:
        reference = None
        for name, precision in backend_runs(args):
            cache = tmp / "backends" / f"{model}-{name}-{precision}"
            startups = []
            for _ in ("empty", "filled"):
                start = time.perf_counter()
                with mock.patch.dict(os.environ, {"VPS_CACHE_DIR": str(cache)}):
                    segmenter = Segmenter(model=model, backend=name, precision=precision)
                startups.append(time.perf_counter() - start)
            segmenter.predict(frames[:segmenter.batch_size])  # warm-up (torch.compile compiles here)
            start = time.perf_counter()
            probabilities = segmenter.predict(frames)
            fps = len(frames) / (time.perf_counter() - start)
            if reference is None:
                reference = probabilities
            row(f"{model} {name} {precision}, batch {segmenter.batch_size}", f"{fps:.3f} f/s",
                f"start-up {startups[0]:.1f} s, cached {startups[1]:.1f} s; {agreement(reference, probabilities)}")


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<46} {value:>14}  {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("baseline", "backends", "engine", "bf16", "light", "memory"),
                        default=["baseline", "backends", "engine", "bf16", "light", "memory"])
    parser.add_argument("--baseline-frames", type=int, default=100,
                        help="frames of the vps-segment vs plain encoder loop clip (100)")
    parser.add_argument("--backend-models", nargs="+", choices=("autosam", "light"), default=["autosam", "light"],
                        help="models of the backend comparison (autosam light)")
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile in the backend comparison (minutes of compilation per run)")
    parser.add_argument("--checkpoint", type=Path, help="g/h checkpoint (default: random weights, default config)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sam", default="litemedsam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"))
    parser.add_argument("--frames", type=int, default=12, help="frames of the AutoSAM clip (12)")
    parser.add_argument("--light-frames", type=int, default=200, help="frames of the light-model clip (200)")
    parser.add_argument("--long-frames", type=int, nargs=2, default=[300, 3000], help="memory test lengths")
    parser.add_argument("--decoders", nargs="+", choices=("av", "decord"), default=["av", "decord"],
                        help="decoders of the memory test (av decord)")
    parser.add_argument("--memory-models", nargs="+", choices=("light", "autosam"), default=["light"],
                        help="models of the memory test (light; autosam takes hours on a CPU)")
    parser.add_argument("--memory-threads", type=int, help="vps-segment --threads in the memory test (default: "
                        "torch's; 1 keeps a loaded machine's runs short, memory growth is the same)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="engine batch sizes to compare (default: 1 2 4 on CPU, 16 32 64 on CUDA)")
    parser.add_argument("--precision", default="fp32", help="precision of the engine ratio (fp32)")
    args = parser.parse_args(argv)
    quiet_decoders()
    device = torch.device(args.device)
    batches = args.batch_sizes or ([16, 32, 64] if device.type == "cuda" else [1, 2, 4])
    print(f"hardware: {hardware()}")
    with tempfile.TemporaryDirectory(prefix="vps-bench-") as tmp, \
            mock.patch.dict(os.environ, {"VPS_CACHE_DIR": str(Path(tmp) / "cache")}):
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(tmp / "random.pt", args.sam)
        if "baseline" in args.only:
            baseline(args, tmp)
        if "backends" in args.only:
            backends(args, tmp)
        print(f"model: {'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'random weights, default config'}"
              f", SAM {args.sam}, device {device}")

        if "engine" in args.only or "bf16" in args.only:
            video, what = make_clip(tmp, args.frames)
            print(f"clip: {what}")
            model = load(checkpoint, "autosam", args.sam)
            frames = decoded_frames(video)
            results = {}
            if "engine" in args.only:
                print(f"AutoSAM ({args.sam}), {args.precision}:")
                plain = plain_loop_fps(model, video, device) if args.precision == "fp32" else None
                if plain:
                    row("plain per-frame loop (decode all, then model)", f"{plain:.3f} f/s", "baseline")
                for batch in batches:
                    eng = engine(model, device, args.precision)
                    results[batch] = model_only_fps(eng, frames, batch)
                    row(f"engine model-only, batch {batch}", f"{results[batch]:.3f} f/s")
                best = max(results, key=results.get)
                e2e = end_to_end_fps(model, device, args.precision, video, best, tmp)
                row(f"engine end to end (vps-segment), batch {best}", f"{e2e:.3f} f/s")
                if plain:
                    row("  ratio end-to-end / plain loop", f"{e2e / plain:.2f}x", "target >= 1.5x")
                row("  ratio end-to-end / model-only", f"{e2e / results[best]:.0%}", "target >= 90%")
                unopt = engine(model, device, args.precision, optimize=False)
                row(f"engine without channels-last/fusion, batch {best}",
                    f"{model_only_fps(unopt, frames, best):.3f} f/s", "ablation")
            if "bf16" in args.only:
                low = "bf16" if device.type == "cpu" else "fp16"
                batch = max(results, key=results.get) if results else batches[0]
                fp32 = results.get(batch) if args.precision == "fp32" and results else None
                if fp32 is None:
                    fp32 = model_only_fps(engine(model, device, "fp32"), frames, batch)
                half = model_only_fps(engine(model, device, low), frames, batch)
                print(f"AutoSAM ({args.sam}) precision, batch {batch}, model-only:")
                row("fp32", f"{fp32:.3f} f/s")
                row(low, f"{half:.3f} f/s")
                row(f"  ratio {low} / fp32", f"{half / fp32:.2f}x")
                if low == "bf16":
                    row("bf16 end to end (vps-segment)", f"{end_to_end_fps(model, device, 'bf16', video, batch, tmp):.3f} f/s")

        if "light" in args.only:
            (tmp / "light").mkdir()
            video, what = make_clip(tmp / "light", args.light_frames)
            print(f"light model (g + h), clip: {what}")
            model = load(checkpoint, "light", args.sam)
            frames = decoded_frames(video)
            light_batches = [1, 4, 8] if device.type == "cpu" else batches
            runs = [("eager", "fp32"), ("eager", "bf16")]
            runs += [("openvino", "bf16")] if device.type == "cpu" and is_installed("openvino") else []
            for backend, precision in runs:
                rates = {b: model_only_fps(engine(model, device, precision, backend=backend), frames, b)
                         for b in light_batches}
                best = max(rates, key=rates.get)
                e2e = end_to_end_fps(model, device, precision, video, best, tmp, backend)
                row(f"{backend} {precision} model-only, batch " + "/".join(map(str, rates)),
                    "/".join(f"{r:.1f}" for r in rates.values()) + " f/s")
                row(f"{backend} {precision} end to end, batch {best}", f"{e2e:.1f} f/s",
                    "goal 60 f/s at 384x288 on CPU")

        if "memory" in args.only:
            memory(args, checkpoint, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
