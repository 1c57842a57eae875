"""Pairing two ViT-L-sized safetensors files (~1.2 GB each) streams tensor by tensor.

Baseline, in the same run: `cp` of the same bytes (the target and the auxiliary file). Variants are
interleaved; each runs in its own process so its peak memory is its own.

    .venv/bin/python benchmarks/pair.py [--size vit_l] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SIZES, interleave, make_vit, print_table, run_child


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="vit_l")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-no-sha", action="store_true", help="Leave out the variant without the sha256.")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmsurgery-bench")
    args = ap.parse_args()
    work = args.dir / f"pair-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    target = work / "target.safetensors"
    aux = work / "aux.safetensors"
    for path, seed in ((target, 0), (aux, 1)):
        if not path.exists():
            make_vit(path, args.size, seed)
    out = work / "paired.safetensors"
    size_gb = (target.stat().st_size + aux.stat().st_size) / 1e9

    def cp() -> dict[str, float]:
        t0 = time.perf_counter()
        subprocess.run(["cp", str(target), str(work / "cp_t")], check=True)
        subprocess.run(["cp", str(aux), str(work / "cp_a")], check=True)
        subprocess.run(["sync"], check=True)
        dt = time.perf_counter() - t0
        (work / "cp_t").unlink()
        (work / "cp_a").unlink()
        return {"seconds": dt, "process_seconds": dt, "rss_mb": 0.0, "anon_mb": 0.0}

    def pair(hash_inputs: bool) -> dict[str, float]:
        body = f"pair({str(target)!r}, {str(aux)!r}, {str(out)!r}, force=True)"
        if not hash_inputs:
            body = (
                'import mmsurgery.checkpoint.hashing as h; h.sha256_of = lambda files, opener=None: 64 * "0"\n' + body
            )
        r = run_child(
            "import torch, mmsurgery.cli\nfrom mmsurgery.pairing import pair", body + "\nimport os; os.sync()"
        )
        out.unlink()
        return r

    variants = {"cp target+aux": cp, "pair": lambda: pair(True), "pair (no sha256)": lambda: pair(False)}
    if args.skip_no_sha:
        del variants["pair (no sha256)"]
    results = interleave(variants, args.repeats)
    print(f"\n{args.size}: target + aux = {size_gb:.2f} GB; paired output written and synced; median of {args.repeats}")
    print_table(results, "cp target+aux", wall="wall after imports (s)")
    print(f"\ncommand: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
