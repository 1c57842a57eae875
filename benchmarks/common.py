"""Shared pieces of the benchmarks: synthetic ViT-sized checkpoints, child-process runners that report their
own peak memory, and interleaved timing. Each benchmark prints ratios against a baseline run in the same process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VitSize:
    """A timm ViT's shape at `img` px: `tokens` = 1 + (img / patch)² (197 for /16 at 224 px, 257 for /14)."""

    embed: int
    depth: int
    heads: int
    mlp: int
    patch: int = 16
    img: int = 224
    classes: int = 1000

    @property
    def tokens(self) -> int:
        return 1 + (self.img // self.patch) ** 2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the timm-named ViT, in timm's order."""
        d, h = self.embed, self.mlp
        shapes: dict[str, tuple[int, ...]] = {
            "cls_token": (1, 1, d),
            "pos_embed": (1, self.tokens, d),
            "patch_embed.proj.weight": (d, 3, self.patch, self.patch),
            "patch_embed.proj.bias": (d,),
        }
        for i in range(self.depth):
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
        return shapes | {
            "norm.weight": (d,),
            "norm.bias": (d,),
            "head.weight": (self.classes, d),
            "head.bias": (self.classes,),
        }

    def vit_config(self) -> dict[str, object]:
        """The built-in ViT's config (`mmsurgery.models.vit.ViTConfig.to_dict()`), as the `mmsurgery.vit` metadata
        carries it: the only place the head count can live (ViT-H/14 has 16, not the head-dim-64 rule's 20)."""
        from mmsurgery.models.vit import ViTConfig

        return ViTConfig(
            img_size=self.img,
            patch_size=self.patch,
            embed_dim=self.embed,
            depth=self.depth,
            num_heads=self.heads,
            mlp_hidden=self.mlp,
            num_classes=self.classes,
        ).to_dict()


VITS = {  # timm's ViTs at 224 px, 1000 classes; "tiny" is for smoke tests (heads not by the head-dim-64 rule, /14)
    "tiny": VitSize(embed=64, depth=2, heads=4, mlp=256, patch=14),
    "vit_t": VitSize(embed=192, depth=12, heads=3, mlp=768),
    "vit_s": VitSize(embed=384, depth=12, heads=6, mlp=1536),
    "vit_b": VitSize(embed=768, depth=12, heads=12, mlp=3072),
    "vit_l": VitSize(embed=1024, depth=24, heads=16, mlp=4096),
    "vit_h": VitSize(embed=1280, depth=32, heads=16, mlp=5120, patch=14),
}

SIZES = {k: (v.embed, v.depth, v.mlp) for k, v in VITS.items()}  # width, depth, MLP width (fold, pair, weights)

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


def make_vit(
    path: Path,
    size: str,
    seed: int,
    *,
    gen_timm_names: bool = True,
    timm_init: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """A timm-named ViT-sized float32 safetensors file (`VITS[size]`), written tensor by tensor (never whole in
    memory). Every tensor is N(0, 0.02²) unless `timm_init`: then LayerNorm weights are 1, biases 0 and the cls token
    N(0, (1e-6)²), as `VisionTransformer.reset_parameters` leaves them (a model whose activations stay in range)."""
    from mmsurgery.checkpoint import TensorInfo
    from mmsurgery.checkpoint.writer import SafetensorsWriter

    specs = [TensorInfo(k, "float32", s) for k, s in VITS[size].shapes().items()]
    with SafetensorsWriter(path, specs, metadata=metadata, force=True) as w:
        for k, t in vit_tensors(size, seed, timm_init=timm_init):
            w.write(k, t)
        w.commit()
    return path


def vit_tensors(size: str, seed: int, *, timm_init: bool = False) -> Iterator[tuple[str, Any]]:
    """`make_vit`'s tensors one at a time, in timm's order: the same values for the same arguments, so a file
    written by another writer (`safetensors.torch.save_file`) can hold exactly what `make_vit` writes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for k, s in VITS[size].shapes().items():
        if timm_init and k.endswith("bias"):
            t = torch.zeros(s)
        elif timm_init and k.rpartition(".")[0].rpartition(".")[2].startswith("norm"):
            t = torch.ones(s)  # a LayerNorm's weight
        else:
            t = torch.randn(s, generator=gen) * (1e-6 if timm_init and k == "cls_token" else 0.02)
        yield k, t


def safetensors_numel(path: Path) -> int:
    """Elements of every tensor in a safetensors file, from its header alone (what a parameter count means here)."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


@dataclass(frozen=True)
class ProcessRun:
    """One child process: wall seconds from spawn to reap, its peak RSS (`ru_maxrss` from `os.wait4`, KiB on Linux:
    the child's own, or a waited-for grandchild's if larger), exit code (negative: killed by that signal)."""

    wall: float
    peak_rss_kib: int
    exit_code: int
    timed_out: bool


def run_measured(
    cmd: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    timeout: float | None = None,
) -> ProcessRun:
    """Run `cmd` (the measured program itself, no shell between) with stdout and stderr to `log`; SIGKILL it after
    `timeout` seconds. Never raises on a failing child: the caller records the exit code."""
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer is not None:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if timer is not None:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log is not None:
            out.close()
    return ProcessRun(wall=wall, peak_rss_kib=usage.ru_maxrss, exit_code=proc.returncode, timed_out=fired.is_set())


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


def spread(values: list[float], fmt: str = ".2f") -> str:
    """`median (min–max)` of `values` in `fmt`; the median alone for one value, `-` for none."""
    if not values:
        return "-"
    med = format(statistics.median(values), fmt)
    return med if len(values) < 2 else f"{med} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def run_steps(
    steps: list[tuple[str, Callable[[], object], tuple[Path, ...]]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Run build steps in order, each `(name, step, the files it frees)`: a freed file is measured (GB) and deleted
    right after its step, so at most the files still needed are on disk. Returns (seconds per step, GB per file)."""
    seconds: dict[str, float] = {}
    gb: dict[str, float] = {}
    for name, step, done in steps:
        t0 = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - t0
        for f in done:
            gb[f.stem] = f.stat().st_size / 1e9
            f.unlink()
    return seconds, gb
