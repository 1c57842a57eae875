"""Shared pieces of the benchmarks: synthetic ViT-sized checkpoints, a child-process runner that reports its
own peak memory, and interleaved timing. Each benchmark prints ratios against a baseline run in the same process."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SIZES = {  # width, depth, MLP width (timm ViT-L/16 and ViT-H/14)
    "vit_l": (1024, 24, 4096),
    "vit_h": (1280, 32, 5120),
}

# Runs a python snippet in a fresh interpreter and prints JSON: wall seconds (after imports), peak RSS (VmHWM)
# and peak anonymous memory (RssAnon, sampled every 5 ms: mmapped file pages count in RSS but are page cache).
CHILD = r"""
import json, re, sys, threading, time
peak = [0]
def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1))
def sample():
    while True:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
SETUP
t0 = time.perf_counter()
BODY
dt = time.perf_counter() - t0
peak[0] = max(peak[0], anon())
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": dt, "rss_mb": hwm / 1024, "anon_mb": peak[0] / 1024}))
"""


def run_child(setup: str, body: str) -> dict[str, float]:
    code = CHILD.replace("SETUP", setup).replace("BODY", body)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def make_vit(path: Path, size: str, seed: int, *, gen_timm_names: bool = True) -> Path:
    """A timm-named ViT-sized float32 safetensors file, written tensor by tensor (never whole in memory)."""
    import torch

    from mmsurgery.checkpoint import TensorInfo
    from mmsurgery.checkpoint.writer import SafetensorsWriter

    d, depth, h = SIZES[size]
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (h, d),
            p + "mlp.fc1.bias": (h,),
            p + "mlp.fc2.weight": (d, h),
            p + "mlp.fc2.bias": (d,),
        }
    shapes |= {"norm.weight": (d,), "norm.bias": (d,), "head.weight": (1000, d), "head.bias": (1000,)}
    specs = [TensorInfo(k, "float32", s) for k, s in shapes.items()]
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path, specs, force=True) as w:
        for k, s in shapes.items():
            w.write(k, torch.randn(s, generator=gen) * 0.02)
        w.commit()
    return path


def drop_cache(*paths: Path) -> None:
    """Evict files from the page cache (per file, no global drop), for cold-cache runs."""
    import os

    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def interleave(variants: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def print_table(
    results: dict[str, list[dict[str, float]]], baseline: str, wall: str = "wall after imports (s)"
) -> None:
    """A markdown table: median wall time, its ratio to `baseline` (ratio of medians, and the median and range of
    the per-round ratios: the spread is the VM's), whole-process time and peak memory."""
    base_rows = results[baseline]
    base = median(base_rows, "seconds")
    print(
        f"| method | {wall} | / {baseline} (ratio of medians) | median per-round ratio | per-round min–max "
        "| whole process (s) | peak RSS (MB) | peak anon (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        s = median(rows, "seconds")
        ratios = [r["seconds"] / b["seconds"] for r, b in zip(rows, base_rows, strict=True)]
        print(
            f"| {name} | {s:.2f} | {s / base:.2f} | {statistics.median(ratios):.2f} | "
            f"{min(ratios):.2f}–{max(ratios):.2f} | {median(rows, 'process_seconds'):.2f} | "
            f"{median(rows, 'rss_mb'):.0f} | {median(rows, 'anon_mb'):.0f} |"
        )
