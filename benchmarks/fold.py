"""`mmsurgery fold` on ViT-L- and ViT-H-sized synthetic paired checkpoints, against `cp` of the output bytes and
a naive fold (load both whole, add, save), all in the same run, interleaved, each in its own process; also
`fold --source-hash` and the provenance sha256 of PAIRED alone (the lower bound of a hashed fold's wall time).

    .venv/bin/python benchmarks/fold.py [--sizes vit_l,vit_h] [--repeats 7] [--skip-naive] [--dir DIR]

Reported: wall time after imports (and of the whole process), its ratio to the floor (issue 13: `cat PAIRED >
/dev/null` + `cp TARGET OUT && sync OUT`; the median of the ratios per round, and the ratio of medians), peak RSS
(VmHWM: it counts memory-mapped input pages, which are reclaimable page cache) and peak anonymous memory (RssAnon, sampled every 5 ms: the memory the process really holds).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SIZES, interleave, make_vit, print_table, run_child

NAIVE = """
import torch
from safetensors.torch import load_file, save_file
sd = load_file(PAIRED)
out = {}
for k, v in sd.items():
    if k.endswith(".aux_weight") or k.endswith(".cross_modal_scale"):
        continue
    p = k.removesuffix(".weight")
    if k.endswith(".weight") and p + ".cross_modal_scale" in sd:
        v = v + sd[p + ".cross_modal_scale"] * sd[p + ".aux_weight"]
    out[k] = v
save_file(out, OUT)
import os; os.sync()
"""


def bench(size: str, repeats: int, root: Path, skip_naive: bool = False) -> None:
    work = root / f"fold-{size}"
    work.mkdir(parents=True, exist_ok=True)
    target, aux, paired = work / "target.safetensors", work / "aux.safetensors", work / "paired.safetensors"
    if not paired.exists():
        make_vit(target, size, 0)
        make_vit(aux, size, 1)
        from mmsurgery.pairing import pair

        pair(target, aux, paired, init_scale=0.01)
        aux.unlink()
    out = work / "plain.safetensors"
    d, _, h = SIZES[size]
    largest_mb = 4 * d * h / 2**20

    def cp() -> dict[str, float]:
        """The floor: read the paired input once, copy a file of the output's size and sync it."""
        t0 = time.perf_counter()
        subprocess.run(["cat", str(paired)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cp", str(target), str(out)], check=True)
        subprocess.run(["sync", str(out)], check=True)
        dt = time.perf_counter() - t0
        out.unlink()
        return {"seconds": dt, "process_seconds": dt, "rss_mb": 0.0, "anon_mb": 0.0}

    def fold() -> dict[str, float]:
        """`mmsurgery fold` as it runs by default (no provenance hash)."""
        r = run_child("from mmsurgery.fold import fold_file", f"fold_file({str(paired)!r}, {str(out)!r})")
        out.unlink()
        return r

    def fold_hashed() -> dict[str, float]:
        """`mmsurgery fold --source-hash`: the same fold plus the sha256 of PAIRED on a second thread."""
        r = run_child(
            "from mmsurgery.fold import fold_file", f"fold_file({str(paired)!r}, {str(out)!r}, source_hash=True)"
        )
        out.unlink()
        return r

    def hash_only() -> dict[str, float]:
        """The provenance hash alone: what fold's second thread does (read PAIRED, sha256 it), on one core."""
        setup = "from pathlib import Path; from mmsurgery.checkpoint.hashing import sha256_of"
        return run_child(setup, f"sha256_of([Path({str(paired)!r})])")

    def naive() -> dict[str, float]:
        body = NAIVE.replace("PAIRED", repr(str(paired))).replace("OUT", repr(str(out)))
        r = run_child("import torch, safetensors.torch", body)
        out.unlink()
        return r

    def imports() -> dict[str, float]:
        return run_child("from mmsurgery.fold import fold_file", "pass")

    variants = {
        "floor (cat + cp + sync)": cp,
        "mmsurgery fold": fold,
        "mmsurgery fold --source-hash": fold_hashed,
        "sha256 of PAIRED alone (the hash thread's work)": hash_only,
        "naive fold": naive,
        "imports only": imports,
    }
    if skip_naive:
        del variants["naive fold"]
    results = interleave(variants, repeats)
    gb = target.stat().st_size / 1e9
    print(
        f"\n{size}: paired input {paired.stat().st_size / 1e9:.2f} GB, plain output {gb:.2f} GB, "
        f"largest tensor {largest_mb:.0f} MiB; median of {repeats}, hot page cache"
    )
    print_table(results, "floor (cat + cp + sync)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="vit_l,vit_h")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-naive", action="store_true", help="Leave out the naive fold (it needs ~4-8 GB).")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmsurgery-bench")
    ap.add_argument("--keep", action="store_true", help="Keep the synthetic files for another run.")
    args = ap.parse_args()
    for size in args.sizes.split(","):
        bench(size, args.repeats, args.dir, args.skip_naive)
    print(f"\ncommand: {' '.join(sys.argv)}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
