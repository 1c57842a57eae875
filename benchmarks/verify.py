"""The ViT-S deployment gate: `mmsurgery verify PLAIN --against PAIRED --onnx`, all stages, wall and per stage.

Builds a ViT-S pair (embed 384, depth 12, heads 6; target and aux `VisionTransformer(vit_small())` with seeds 0
and 1, paired, λ ~ N(0, 0.3²) and every tensor moved a little, as training leaves it) and folds it. Then runs the
console command in fresh processes, interleaved with a baseline in the same run: the imports every gate pays
(`python -c "import torch, onnx, onnxruntime, mmsurgery.verify"`). `--before DIR` adds the same command run
from another checkout of mmsurgery (e.g. `git worktree add ../mmsurgery-before <commit>`), put first on PYTHONPATH.

    .venv/bin/python benchmarks/verify.py [--repeats 3] [--before ../mmsurgery-before]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("weights", "keys", "fold", "onnx", "cost", "latency")


def build(work: Path) -> tuple[Path, Path]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mmsurgery.fold import fold_file
    from mmsurgery.models.vit import VisionTransformer, vit_small
    from mmsurgery.pairing import pair

    trained, plain = work / "trained.safetensors", work / "plain.safetensors"
    if plain.exists():
        return plain, trained
    for seed, name in ((0, "target"), (1, "aux")):
        torch.manual_seed(seed)
        save_file(VisionTransformer(vit_small()).state_dict(), work / f"{name}.safetensors")
    paired = pair(work / "target.safetensors", work / "aux.safetensors", work / "p.safetensors", force=True).output
    sd = load_file(paired)
    with safe_open(paired, "pt") as f:
        meta = f.metadata()
    g = torch.Generator().manual_seed(2)
    for k in sd:
        if k.endswith("cross_modal_scale"):
            sd[k] = torch.randn(1, generator=g) * 0.3
        else:
            sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, trained, metadata=meta)
    fold_file(trained, plain, force=True)
    return plain, trained


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, report: Path | None = None) -> dict[str, float]:
    """One fresh process; `cwd` is the scratch folder, so `python -m` does not find this checkout by accident."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    row = {"wall": wall}
    if report is not None:
        data = json.loads(report.read_text())
        row["inside"] = data["seconds"]
        row |= {s["name"]: s["seconds"] for s in data["stages"]}
        row["export"] = next(s for s in data["stages"] if s["name"] == "onnx")["numbers"].get("export_seconds", 0.0)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", type=Path, help="another mmsurgery checkout to run the same command from")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmsurgery-bench" / "verify-vit-s")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    plain, trained = build(args.dir)
    report = args.dir / "r.json"
    gate = [sys.executable, "-m", "mmsurgery", "verify", str(plain), "--against", str(trained), "--onnx"]
    gate += ["--json", str(report)]
    variants = {
        "imports (torch, onnx, onnxruntime, mmsurgery.verify)": lambda: run(
            [sys.executable, "-c", "import torch, onnx, onnxruntime, mmsurgery.verify"], args.dir
        ),
        "verify (this tree)": lambda: run(gate, args.dir, report=report),
    }
    if args.before is not None:
        env = {**os.environ, "PYTHONPATH": str(args.before.resolve())}
        variants["verify (--before)"] = lambda: run(gate, args.dir, env=env, report=report)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            rows[name].append(fn())
    base = statistics.median(r["wall"] for r in rows[next(iter(variants))])
    print(f"\nViT-S gate, median of {args.repeats} interleaved rounds (seconds; wall includes interpreter start-up)\n")
    cols = ["wall", "/ imports", "inside verify", *STAGES, "export"]
    print("| command | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, rs in rows.items():

        def med(key: str, rs: list[dict[str, float]] = rs) -> str:
            values = [r[key] for r in rs if key in r]
            return f"{statistics.median(values):.1f}" if values else "-"

        wall = statistics.median(r["wall"] for r in rs)
        cells = [f"{wall:.1f}", f"{wall / base:.2f}", med("inside"), *(med(s) for s in STAGES), med("export")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
