"""``vps-segment``: segment polyps in colonoscopy videos, frame folders or SUN-SEG style roots.

    vps-segment clip.mp4 --out masks.mp4 [--png-dir pngs] [--overlay overlay.mp4]
    vps-segment a.mp4 b.mp4 frames/ --out-dir OUT        # OUT/<case>_mask.mp4 for each clip
    vps-segment Kvasir/images --stills --png-dir OUT     # images of any size: OUT/images/<stem>.png
    torchrun --nproc-per-node 4 -m vps.cli.segment SUN-SEG/TestHardDataset --out-dir OUT

See docs/segment.md.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

PROG = "vps-segment"


class UsageError(ValueError):
    """A bad combination of options: one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one ``vps-segment: error: ...`` line and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Segment polyps in colonoscopy videos with AutoSAM (no prompt needed).",
        epilog="Masks are lossless (H.264 qp 0, grey); see docs/segment.md.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="video files (mp4, avi, mov, mkv), frame folders, or SUN-SEG style roots")
    out = parser.add_argument_group("outputs (at least one)")
    out.add_argument("--out", type=Path, help="mask video for a single clip (binary, 0/255, lossless)")
    out.add_argument("--out-dir", type=Path, help="for many clips: writes <DIR>/<case>_mask.mp4 for each")
    out.add_argument("--png-dir", type=Path, help="8-bit probability maps as <DIR>/<case>/<frame>.png")
    out.add_argument("--overlay", nargs="?", const="auto", metavar="PATH",
                     help="video of the frames with the mask tinted and outlined; without PATH: "
                          "<DIR>/<case>_overlay.mp4 with --out-dir, else <out stem>_overlay.mp4")
    out.add_argument("--overwrite", action="store_true",
                     help="replace outputs that exist (never an input: outputs that are inputs are refused)")
    out.add_argument("--stills", action="store_true",
                     help="folders of independent images of any size: one probability map per image, "
                          "at the image's size, in --png-dir (no mask video)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=("autosam", "light", "head"), default="autosam",
                       help="autosam: g + frozen SAM (default); light: g + surrogate decoder h, no SAM; head: "
                            "frozen SAM + a prompt-free head (vit, cnn, linear) from --checkpoint")
    model.add_argument("--checkpoint", type=Path, help="g/h checkpoint (default: the built-in model)")
    model.add_argument("--sam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"),
                       help="SAM backend (default: the checkpoint's)")
    model.add_argument("--sam-checkpoint", type=Path, help="weights of SAM vit_* (LiteMedSAM's are installed)")
    model.add_argument("--box-refinement", action=argparse.BooleanOptionalAction, default=None,
                       help="AutoSAM: decode again with the box of each part of the first mask as SAM's prompt and "
                            "average the two (default: the checkpoint's setting; on for the built-in model)")
    model.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                       help="AutoSAM: average g's prompt with its prompt for the mirrored frame; SAM's encoder runs "
                            "once (default: the checkpoint's setting; on for the built-in model)")
    model.add_argument("--embedding-prompt", action=argparse.BooleanOptionalAction, default=None,
                       help="AutoSAM: mix the checkpoint's second prompt generator, on SAM's image embedding, into "
                            "g's prompt (default: when the checkpoint has one)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision; fp16 on CUDA only (default auto: bf16 on CUDA and on CPUs with "
                          "native bf16, AVX512-BF16 or AMX; fp32 on other CPUs)")
    run.add_argument("--backend", choices=("auto", "eager", "openvino", "onnx", "compile"), default="auto",
                     help="what runs the network (default auto: OpenVINO where installed, on a CPU, else torch "
                          "eager); onnx: ONNX Runtime, fp32; compile: torch.compile, minutes of start-up")
    run.add_argument("--batch-size", type=int, default=None,
                     help="frames per model call (default: 32 on CUDA; on CPU 1 for autosam, 4 for light)")
    run.add_argument("--threshold", type=float, default=0.5, help="sigmoid threshold of binary masks (0.5)")
    run.add_argument("--tile", type=int, default=None, metavar="SIZE",
                     help="with --stills: segment images larger than SIZE pixels in overlapping SIZE x SIZE tiles, "
                          "blended (objects keep their scale instead of shrinking to the model's input)")
    run.add_argument("--smooth", type=int, default=0, metavar="N",
                     help="exponential moving average of the probabilities over ~N frames (off)")
    run.add_argument("--decoder", choices=("av", "decord"), default="av",
                     help="video decoder: PyAV (default, memory flat whatever the length) or decord "
                          "(decodes ahead without bound: memory grows with long videos)")
    run.add_argument("--fps", type=float, default=25.0, help="frame rate of outputs for frame folders (25)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    run.add_argument("--quiet", action="store_true", help="no progress (bar or log lines)")
    return parser


# ---- outputs -----------------------------------------------------------------------------------


@dataclass
class Outputs:
    """Where one clip's results go (None: not written)."""

    mask: Optional[Path] = None
    overlay: Optional[Path] = None
    png_root: Optional[Path] = None
    classes: Tuple[str, ...] = ()  # a model with named classes: one set of outputs per class (for_class)

    def for_class(self, name: str) -> "Outputs":
        """Class ``name``'s outputs: videos ``<stem>_<name><suffix>``, PNG maps under ``<png_root>/<name>/``."""
        def video(path: Optional[Path]) -> Optional[Path]:
            return path.with_name(f"{path.stem}_{name}{path.suffix}") if path else None
        return Outputs(video(self.mask), video(self.overlay), self.png_root / name if self.png_root else None)

    def describe(self, case: str) -> List[str]:
        if self.classes:
            return [part for name in self.classes for part in self.for_class(name).describe(case)]
        parts = []
        if self.mask:
            parts.append(f"masks {self.mask}")
        if self.png_root:
            parts.append(f"pngs {self.png_root / case}")
        if self.overlay:
            parts.append(f"overlay {self.overlay}")
        return parts

    def targets(self, case: str) -> List[Tuple[str, Path, bool]]:
        """(what, path, is a folder) of every output of clip ``case``."""
        if self.classes:
            return [target for name in self.classes for target in self.for_class(name).targets(case)]
        targets = []
        if self.mask:
            targets.append(("the mask video", self.mask, False))
        if self.overlay:
            targets.append(("the overlay video", self.overlay, False))
        if self.png_root:
            targets.append(("the PNG folder", self.png_root / case, True))
        return targets


def plan_outputs(args: argparse.Namespace, clips: list, classes: Tuple[str, ...] = ()) -> List[Outputs]:
    """The output paths of each clip, from --out/--out-dir/--png-dir/--overlay (per class for named ``classes``).

    Refuses, before any work, two outputs on one path and outputs that are or would write into inputs.
    """
    if not (args.out or args.out_dir or args.png_dir or args.overlay):
        raise UsageError("nothing to write: give --out, --out-dir, --png-dir or --overlay")
    if args.out and args.out_dir:
        raise UsageError("give --out (one clip) or --out-dir (many clips), not both")
    if args.out and len(clips) > 1:
        raise UsageError(f"--out names one file but the inputs hold {len(clips)} clips; use --out-dir")
    if args.overlay not in (None, "auto") and len(clips) > 1:
        raise UsageError(f"--overlay PATH names one file but the inputs hold {len(clips)} clips; "
                         "use --out-dir with --overlay")
    plans = []
    for clip in clips:
        plan = Outputs(png_root=args.png_dir, classes=classes)
        if args.out_dir:
            plan.mask = args.out_dir / f"{clip.case}_mask.mp4"
        elif args.out:
            plan.mask = args.out
        if args.overlay == "auto":
            if args.out_dir:
                plan.overlay = args.out_dir / f"{clip.case}_overlay.mp4"
            elif args.out:
                plan.overlay = args.out.with_name(f"{args.out.stem}_overlay.mp4")
            else:
                raise UsageError("--overlay without PATH needs --out or --out-dir")
        elif args.overlay:
            plan.overlay = Path(args.overlay)
        for video in (plan.mask, plan.overlay):
            if video is not None and video.suffix.lower() not in (".mp4", ".mkv", ".mov"):
                raise UsageError(f"{video}: output videos must end in .mp4, .mkv or .mov")
        plans.append(plan)
    cases = [clip.case for clip in clips]
    duplicates = sorted({c for c in cases if cases.count(c) > 1})
    if duplicates and (args.out_dir or args.png_dir):
        raise UsageError(f"two inputs have the same case name '{duplicates[0]}'; their outputs would collide")
    refuse_shared_outputs(plans, clips)
    refuse_outputs_on_inputs(plans, clips)
    return plans


def real_path(path: Path) -> Path:
    """Absolute, with symlinks resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(path))


def is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both real paths)."""
    return path == folder or folder in path.parents


def refuse_shared_outputs(plans: List[Outputs], clips: list) -> None:
    """Two outputs on one path would share a temporary file and overwrite each other; a file inside a
    PNG folder would be deleted when that folder is replaced."""
    seen = {}
    folders = []
    for plan, clip in zip(plans, clips):
        for what, path, is_folder in plan.targets(clip.case):
            what = f"{what} of {clip.case}" if len(clips) > 1 else what
            real = real_path(path)
            if real in seen:
                raise UsageError(f"two outputs on one path: {seen[real]} and {what} are both {path}")
            seen[real] = what
            if is_folder:
                folders.append((real, what))
    for real, what in seen.items():
        for folder, folder_what in folders:
            if real != folder and is_within(real, folder):
                raise UsageError(f"{what} {real} is inside {folder_what} {folder}, which is replaced as a whole")


def refuse_outputs_on_inputs(plans: List[Outputs], clips: list) -> None:
    """--overwrite replaces earlier outputs, never inputs: refuse an output that is an input file, or a
    file or folder that is, holds or sits in an input frame folder."""
    files = [real_path(clip.path) for clip in clips if clip.kind == "video"]
    folders = [real_path(clip.path) for clip in clips if clip.kind != "video"]
    for plan, clip in zip(plans, clips):
        for what, path, is_folder in plan.targets(clip.case):
            real = real_path(path)
            for file in files:
                if real == file or (is_folder and is_within(file, real)):
                    raise UsageError(f"{what} {path} would replace the input {file}; outputs never replace "
                                     "inputs, not even with --overwrite")
            for folder in folders:
                if is_within(real, folder) or (is_folder and is_within(folder, real)):
                    raise UsageError(f"{what} {path} would write into the input frame folder {folder}; outputs "
                                     "never replace inputs, not even with --overwrite")


def check_outputs(plans: List[Outputs], clips: list, overwrite: bool) -> None:
    from vps.video import check_output

    for plan, clip in zip(plans, clips):
        for _, path, _ in plan.targets(clip.case):
            check_output(path, overwrite)


class OutputSink:
    """Writes results in a background thread (video encoding and PNG compression overlap the model).

    ``write`` queues a batch; an error in the thread is raised by the next ``write`` or ``close``.
    ``close`` renames every output to its final name; ``abort`` removes the temporary files.
    """

    def __init__(self, plan: Outputs, case: str, info, threshold8: int, overwrite: bool, depth: int = 4) -> None:
        from vps.video import MaskVideoWriter, OverlayVideoWriter, PngWriter

        self.threshold8 = threshold8
        self.writers = []
        try:
            self.mask = MaskVideoWriter(plan.mask, info) if plan.mask else None
            self.writers.append(self.mask)
            self.overlay = OverlayVideoWriter(plan.overlay, info) if plan.overlay else None
            self.writers.append(self.overlay)
            self.png = PngWriter(plan.png_root, case, overwrite) if plan.png_root else None
            self.writers.append(self.png)
        except BaseException:
            self.abort()
            raise
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="vps-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure
            try:
                self._write(*item)
            except BaseException as error:
                self._error = error

    def _write(self, names: List[str], frames, probabilities, pts: List[Optional[int]]) -> None:
        import torch

        from vps.inference import probabilities_to_uint8

        for i, name in enumerate(names):
            levels = probabilities_to_uint8(torch.from_numpy(probabilities[i])).numpy()
            if self.mask or self.overlay:
                mask = np.where(levels >= self.threshold8, np.uint8(255), np.uint8(0))
            if self.mask:
                self.mask.write(mask, pts[i])
            if self.overlay:
                self.overlay.write(frames[i], mask, pts[i])
            if self.png:
                self.png.write(name, levels)

    def write(self, names: List[str], frames, probabilities, pts: Optional[List[Optional[int]]] = None) -> None:
        """names: B frame names; frames: B x H x W x 3 uint8 RGB (used by the overlay); probabilities: B x H x W
        float32 in [0, 1] (or a list of maps of different sizes), written as 8-bit maps; pts: the frames'
        timestamps."""
        if self._error is not None:
            raise self._error
        self._queue.put((names, frames, probabilities, pts or [None] * len(names)))

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        self._finish()
        if self._error is not None:
            raise self._error
        for writer in self.writers:
            if writer is not None:
                writer.close()

    def abort(self) -> None:
        if hasattr(self, "_thread"):
            self._finish()
        for writer in self.writers:
            if writer is not None:
                writer.abort()


class ClassSinks:
    """One OutputSink per class of a model with named classes; ``write`` hands each its class's maps (maps with a
    class axis after the batch axis: B x K x H x W, or a list of K x H x W maps for stills)."""

    def __init__(self, sinks: List[OutputSink]) -> None:
        self.sinks = sinks

    def write(self, names: List[str], frames, maps, pts: Optional[List[Optional[int]]] = None) -> None:
        for k, sink in enumerate(self.sinks):
            if len(self.sinks) == 1:
                sink.write(names, frames, maps, pts)
            else:
                sink.write(names, frames, [m[k] for m in maps] if isinstance(maps, list) else maps[:, k], pts)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def abort(self) -> None:
        for sink in self.sinks:
            sink.abort()


def open_sink(plan: Outputs, case: str, info, threshold8: int, overwrite: bool):
    """An OutputSink, or with named classes one per class (ClassSinks)."""
    if not plan.classes:
        return OutputSink(plan, case, info, threshold8, overwrite)
    sinks: List[OutputSink] = []
    try:
        for name in plan.classes:
            sinks.append(OutputSink(plan.for_class(name), case, info, threshold8, overwrite))
    except BaseException:
        ClassSinks(sinks).abort()
        raise
    return ClassSinks(sinks)


# ---- running -----------------------------------------------------------------------------------


def output_classes(args: argparse.Namespace) -> Tuple[str, ...]:
    """The class names of a head checkpoint trained with ``data.classes`` (outputs per class), else ()."""
    from vps.modeling import read_checkpoint

    if args.model != "head" or args.checkpoint is None:
        return ()
    return tuple(read_checkpoint(args.checkpoint)["meta"].get("classes") or ())


@dataclass
class Totals:
    frames: int = 0
    clips: int = 0
    written: List[str] = field(default_factory=list)


def folder_fps(args: argparse.Namespace) -> Fraction:
    return Fraction(args.fps).limit_denominator(1001)


def segment_clip(clip, plan: Outputs, segmenter, args: argparse.Namespace, totals: Totals,
                 progress_position: int = 0, prefix: str = PROG) -> None:
    """Stream one clip through the Segmenter into its outputs (stills: each image at its own size)."""
    from vps.inference import threshold_uint8
    from vps.progress import Progress
    from vps.video import open_source

    source = open_source(clip, args.decoder, folder_fps(args))
    sink = open_sink(plan, clip.case, source.info, threshold_uint8(args.threshold), args.overwrite)
    progress = Progress(clip.case, source.info.num_frames, "image" if clip.kind == "stills" else "frame", args.quiet,
                        prefix, progress_position)
    try:
        for batch in segmenter.segment_batches(source, smooth=args.smooth):
            sink.write(batch.names, batch.frames, batch.probabilities, batch.pts)
            progress.update(len(batch.names))
            totals.frames += len(batch.names)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        progress.close()
    totals.clips += 1
    totals.written.extend(plan.describe(clip.case))


def check_options(args: argparse.Namespace) -> None:
    """Option values and combinations that are wrong whatever the inputs."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.smooth < 0:
        raise UsageError("--smooth must be 0 (off) or a number of frames")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise UsageError(f"--fps must be a positive number of frames per second, got {args.fps:g}")
    if args.stills:
        if args.out or args.out_dir or args.overlay:
            raise UsageError("--stills writes probability maps only: give --png-dir, not --out, --out-dir or --overlay")
        if not args.png_dir:
            raise UsageError("--stills needs --png-dir (one probability map per image)")
        if args.smooth > 1:
            raise UsageError("--smooth works across the frames of a video; stills are independent images")
    if args.tile is not None and not args.stills:
        raise UsageError("--tile works with --stills (images of any size), not with videos or frame folders")
    if args.tile is not None and args.tile < 16:
        raise UsageError(f"--tile must be at least 16 pixels, got {args.tile}")


def as_stills(clips: list) -> list:
    """--stills: every frame folder becomes a folder of independent images; videos are refused."""
    from dataclasses import replace

    for clip in clips:
        if clip.kind == "video":
            raise UsageError(f"--stills takes folders of images, not videos: {clip.path}")
    return [replace(clip, kind="stills") for clip in clips]


def run(args: argparse.Namespace) -> int:
    import torch

    from vps.api import Segmenter
    from vps.inference import resolve_device, threshold_uint8
    from vps.video import distributed_env, find_clips, quiet_decoders, shard

    quiet_decoders()
    rank, world, local_rank = distributed_env()
    check_options(args)
    threshold_uint8(args.threshold)
    device = resolve_device(args.device, local_rank)
    if args.threads:
        torch.set_num_threads(args.threads)
    clips = [clip for path in args.inputs for clip in find_clips(path)]
    if args.stills:
        clips = as_stills(clips)
    plans = plan_outputs(args, clips, output_classes(args))
    mine = shard(list(zip(clips, plans)), rank, world)
    prefix = f"{PROG} [rank {rank}/{world}]" if world > 1 else PROG
    if not mine:
        print(f"{prefix}: no clips for this rank ({len(clips)} clips, {world} ranks)", file=sys.stderr)
        return 0
    check_outputs([p for _, p in mine], [c for c, _ in mine], args.overwrite)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    segmenter = Segmenter(checkpoint=args.checkpoint, model=args.model, device=device, precision=args.precision,
                          batch_size=args.batch_size, sam_backend=args.sam, sam_checkpoint=args.sam_checkpoint,
                          tile=args.tile, backend=args.backend, box_refinement=args.box_refinement,
                          flip_tta=args.flip_tta, embedding_prompt=args.embedding_prompt)
    totals = Totals()
    start = time.perf_counter()
    for clip, plan in mine:
        segment_clip(clip, plan, segmenter, args, totals, prefix=prefix)
    seconds = time.perf_counter() - start
    rate = totals.frames / seconds if seconds > 0 else float("inf")
    where = "; ".join(totals.written) if totals.clips <= 3 else "; ".join(totals.written[:3]) + "; ..."
    unit = "images" if args.stills else "frames"
    print(f"{prefix}: {totals.frames} {unit} from {totals.clips} {'folder' if args.stills else 'clip'}(s) in "
          f"{seconds:.1f} s ({rate:.1f} {unit}/s) on {device}, {segmenter.backend}, {segmenter.precision}; {where}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or an argument error already printed as one line
        return int(exit_request.code or 0)
    from vps.video import InputError

    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; unfinished outputs were removed", file=sys.stderr)
        return 130
    except (InputError, UsageError, ValueError, OSError) as error:  # CheckpointError is a ValueError
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, OSError) and getattr(error, "filename", None):
            message = f"{error.filename}: {error.strerror}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
