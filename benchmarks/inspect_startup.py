"""`mmsurgery inspect` on a 2 GB safetensors file reads the header only and never imports torch.

Runs the installed console script in fresh processes, interleaved with two baselines in the same run: a bare
interpreter start-up and `python -c "import torch"` (what inspect cost when it imported torch). The file is a
sparse ViT-L-shaped safetensors file: a real header over 2 GB of data that is never written or read.

    .venv/bin/python benchmarks/inspect_startup.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SIZES


def sparse_vit(path: Path, size: str) -> int:
    """Write a safetensors header for a `size` ViT with timm names; the data section is a hole. Returns bytes."""
    d, depth, h = SIZES[size]
    shapes: dict[str, list[int]] = {"cls_token": [1, 1, d], "pos_embed": [1, 197, d]}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {p + "norm1.weight": [d], p + "attn.qkv.weight": [3 * d, d], p + "attn.qkv.bias": [3 * d]}
        shapes |= {p + "attn.proj.weight": [d, d], p + "norm2.weight": [d], p + "mlp.fc1.weight": [h, d]}
        shapes |= {p + "mlp.fc2.weight": [d, h]}
    header, pos = {}, 0
    for name, shape in shapes.items():
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + pos)
    return 8 + len(raw) + pos


def run(cmd: list[str]) -> dict[str, float]:
    """Wall time of one process and its own peak RSS (`os.wait4` returns the child's rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--size", choices=sorted(SIZES), default="vit_h")
    args = ap.parse_args()
    script = str(Path(sys.executable).with_name("mmsurgery"))
    with tempfile.TemporaryDirectory(prefix="mmsurgery-bench-") as tmp:
        path = Path(tmp) / "big.safetensors"
        size = sparse_vit(path, args.size)
        imports = subprocess.run(
            [sys.executable, "-X", "importtime", script, "inspect", str(path)], capture_output=True, text=True
        ).stderr
        torch_loaded = bool(re.search(r"\|\s+torch$", imports, re.MULTILINE))
        variants = {
            "python (start-up only)": [sys.executable, "-c", "pass"],
            "mmsurgery inspect (table)": [script, "inspect", str(path)],
            "mmsurgery inspect --json": [script, "inspect", str(path), "--json"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        }
        rows: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, cmd in variants.items():
                rows[name].append(run(cmd))
    base = statistics.median(r["wall"] for r in rows["python (start-up only)"])
    print(f"\n{args.size}: {size / 1e9:.2f} GB safetensors (sparse); torch imported by inspect: {torch_loaded}")
    print(f"median of {args.repeats} interleaved rounds, whole process wall incl. interpreter start-up\n")
    print("| command | wall (s) | / python start-up | peak RSS (MB) |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        w = statistics.median(r["wall"] for r in rs)
        print(f"| {name} | {w:.3f} | {w / base:.1f} | {statistics.median(r['rss_mb'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
