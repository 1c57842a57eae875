"""verify's weights stage on ViT-L-sized files: PLAIN proven bit-identical to the fold of PAIRED, streaming.

Baseline, in the same run: `cat PAIRED PLAIN > /dev/null`, the floor of reading both files once. Variants are
interleaved, each in its own process (peak memory is its own), warm page cache (the files were just written or
read), so the ratio shows the stage's own cost over reading the bytes.

    .venv/bin/python benchmarks/weights.py [--size vit_l] [--repeats 3] [--dir DIR] [--cold]

`--cold` evicts both files from the page cache (`posix_fadvise(DONTNEED)`) before every run of every variant.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SIZES, drop_cache, interleave, make_vit, print_table, run_child

STAGE = """
with open_checkpoint(PLAIN) as plain, open_checkpoint(PAIRED) as paired:
    result = check_weights(plain, paired)
assert result.status == "pass", result.message
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="vit_l")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmsurgery-bench")
    ap.add_argument("--cold", action="store_true", help="evict both files from the page cache before each run")
    args = ap.parse_args()
    work = args.dir / f"weights-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    target, aux = work / "target.safetensors", work / "aux.safetensors"
    paired, plain = work / "paired.safetensors", work / "plain.safetensors"
    if not plain.exists():
        from mmsurgery.fold import fold_file
        from mmsurgery.pairing import pair

        make_vit(target, args.size, 0)
        make_vit(aux, args.size, 1)
        pair(target, aux, paired, init_scale=0.01, force=True)
        fold_file(paired, plain, force=True)
        target.unlink()
        aux.unlink()
    size_gb = (paired.stat().st_size + plain.stat().st_size) / 1e9

    def evict() -> None:
        if args.cold:
            drop_cache(paired, plain)

    def cat() -> dict[str, float]:
        evict()
        t0 = time.perf_counter()
        with open("/dev/null", "wb") as null:
            subprocess.run(["cat", str(paired), str(plain)], stdout=null, check=True)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "process_seconds": dt, "rss_mb": 0.0, "anon_mb": 0.0}

    setup = (
        "from mmsurgery.checkpoint import open_checkpoint\nfrom mmsurgery.verify.weights import check_weights\n"
        f"PLAIN, PAIRED = {str(plain)!r}, {str(paired)!r}"
    )

    def stage() -> dict[str, float]:
        evict()
        return run_child(setup, STAGE)

    results = interleave({"cat PAIRED PLAIN": cat, "weights stage": stage}, args.repeats)
    d, _, h = SIZES[args.size]
    print(f"\n{args.size}: PAIRED + PLAIN = {size_gb:.2f} GB, largest tensor {4 * d * h / 2**20:.0f} MB (float32);")
    print(f"{'cold' if args.cold else 'warm'} page cache; median of {args.repeats} interleaved rounds")
    print_table(results, "cat PAIRED PLAIN", wall="wall after imports (s)")


if __name__ == "__main__":
    main()
