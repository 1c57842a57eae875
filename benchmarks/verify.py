"""The deployment gate `mmsurgery verify PLAIN --against PAIRED --onnx`, all six stages, from ViT-S to ViT-H/14:
wall, peak RSS, bytes of peak RSS per parameter and seconds per stage, this tree against another checkout.

Per size (`--sizes`, from `common.VITS`: ViT-S/16, ViT-B/16, ViT-L/16, ViT-H/14 at 224 px, 1000 classes, float32;
`tiny` and `vit_t` for smoke tests) it builds, once, under `--dir`/verify-<size>/ and without ever holding a whole
model: target and aux written tensor by tensor (`common.make_vit`, timm init, the `mmsurgery.vit` config in the
target's metadata so `verify` builds the right head count: ViT-H/14 has 16 heads, not the head-dim-64 rule's 20),
`mmsurgery.pairing.pair`, then the paired file streamed through `SafetensorsWriter` "as training leaves it"
(λ ~ N(0, 0.3²) per pathway, every other tensor moved by 0.01·N(0, 1), the paired metadata kept) into
trained.safetensors, folded by `mmsurgery.fold.fold_file` into plain.safetensors. A re-run reuses them.

Then each variant runs in a fresh process, interleaved round by round (`--repeats` rounds), `sync` before each:

    imports:                python -c "import torch, onnx, onnxruntime, mmsurgery.verify"
    verify (this tree):     python -m mmsurgery verify plain.safetensors --against trained.safetensors --onnx \\
                                --json R [--extra-args ...]
    verify (before ...):    the same with PYTHONPATH=DIR (`--before DIR`, e.g. `git worktree add DIR <commit>`),
                            without the extra args
    --cache adds three runs of this tree with `CACHE_OPTION verify-<size>/export-cache` (`--cache-option`, default
    `--export-cache`): the 1st gate (the cache folder emptied first), the 2nd (whose export agrees with the 1st's,
    which makes the entry bindable) and the repeated gate (which binds PLAIN's weights to the cached graph)

If PLAIN or PAIRED lost the `mmsurgery.vit` config on the way, every verify command gets `--heads N` instead.

Measured per run: wall (spawn to reap, interpreter start-up included), peak RSS of the child (`ru_maxrss` from
`os.wait4`: the python process itself, no shell between), that peak in bytes per parameter of PLAIN (numel summed
over PLAIN's safetensors header), exit code, and from the JSON report the seconds inside verify, per stage and the
onnx stage's `export_seconds`. A run that fails (exit 1, e.g. an exporter that cannot write a > 2 GB graph, or
killed) is recorded as such with its wall and peak RSS, and its failed stages are printed. The table gives medians
over rounds with the per-round min–max, and each median over the `--before` one's; `--out` writes every raw row
as a JSON line.

    .venv/bin/python benchmarks/verify.py [--sizes vit_s,vit_b] [--repeats 3] [--before ../mmsurgery-before]
        [--cache] [--extra-args "..."] [--out rows.jsonl] [--timeout S] [--dir DIR (default: <tempdir>/mmsurgery-bench)]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import VITS, make_vit, run_measured, run_steps, safetensors_numel, spread

STAGES = ("weights", "keys", "fold", "onnx", "cost", "latency")
IMPORTS = "import torch, onnx, onnxruntime, mmsurgery.verify"
BUILD_VERSION = 1  # bump when the files change, so cached ones are rebuilt
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Built:
    plain: Path
    trained: Path
    params: int  # elements of PLAIN
    heads_carried: bool  # PLAIN and trained both carry the `mmsurgery.vit` config with the right head count
    seconds: dict[str, float]  # per build step; empty when the files were cached


def train_like(paired: Path, out: Path, seed: int = 2) -> None:
    """Stream `paired` into `out` as training leaves it: λ ~ N(0, 0.3²), every other tensor + 0.01·N(0, 1)."""
    import torch

    from mmsurgery.checkpoint import open_checkpoint
    from mmsurgery.checkpoint.writer import SafetensorsWriter
    from mmsurgery.paired_format import parse_key

    gen = torch.Generator().manual_seed(seed)
    with open_checkpoint(paired) as ck:
        specs = list(ck.infos.values())
        with SafetensorsWriter(out, specs, metadata=dict(ck.metadata), force=True, inputs=[paired]) as w:
            for name, t in ck.items():
                key = parse_key(name)
                if key is not None and key.kind == "scale":
                    w.write(name, torch.randn(t.shape, generator=gen) * 0.3)
                else:
                    w.write(name, t + 0.01 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
            w.commit()


def vit_heads(path: Path) -> int | None:
    from mmsurgery.checkpoint import open_checkpoint
    from mmsurgery.models.vit import METADATA_KEY

    with open_checkpoint(path) as ck:
        text = ck.metadata.get(METADATA_KEY)
    return None if text is None else json.loads(text).get("num_heads")


def build(size: str, work: Path) -> Built:
    spec = VITS[size]
    plain, trained, stamp = work / "plain.safetensors", work / "trained.safetensors", work / "build.json"
    want = {"version": BUILD_VERSION, "size": asdict(spec)}
    seconds: dict[str, float] = {}
    cached = plain.exists() and trained.exists() and stamp.exists() and json.loads(stamp.read_text())["key"] == want
    if not cached:
        from mmsurgery.fold import fold_file
        from mmsurgery.models.vit import METADATA_KEY
        from mmsurgery.pairing import pair

        target, aux, paired = work / "target.safetensors", work / "aux.safetensors", work / "paired.safetensors"
        meta = {METADATA_KEY: json.dumps(spec.vit_config())}
        stamp.unlink(missing_ok=True)
        steps: list[tuple[str, Callable[[], object], tuple[Path, ...]]] = [  # step, then the files it frees
            ("target", lambda: make_vit(target, size, 0, timm_init=True, metadata=meta), ()),
            ("aux", lambda: make_vit(aux, size, 1, timm_init=True, metadata=meta), ()),
            ("pair", lambda: pair(target, aux, paired, force=True), (target, aux)),
            ("train_like", lambda: train_like(paired, trained), (paired,)),
            ("fold", lambda: fold_file(trained, plain, force=True), ()),
        ]
        seconds, gb = run_steps(steps)  # at most PAIRED twice on disk at once
        stamp.write_text(json.dumps({"key": want, "seconds": seconds, "gb": gb}, indent=1) + "\n")
    carried = vit_heads(plain) == spec.heads and vit_heads(trained) == spec.heads
    return Built(plain, trained, safetensors_numel(plain), carried, seconds)


@dataclass
class Variant:
    name: str
    cmd: list[str]
    env: dict[str, str]
    report: Path | None = None
    prepare: Callable[[], None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


def probe(env: dict[str, str], cwd: Path, code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"python -c {code!r} failed:\n{r.stdout}{r.stderr}")
    return r.stdout.strip()


def check_tree(env: dict[str, str], cwd: Path, expect: Path, what: str) -> None:
    """The mmsurgery that `python -m mmsurgery` runs with `env` is the one under `expect`, not another install."""
    found = Path(probe(env, cwd, "import mmsurgery; print(mmsurgery.__file__)"))
    if not found.resolve().is_relative_to(expect.resolve()):
        raise SystemExit(f"{what}: `python -m mmsurgery` imports {found}, not the checkout {expect}")


def check_options(env: dict[str, str], cwd: Path, options: list[str]) -> None:
    """Fail now, not after an hour of runs, when this tree's `verify` lacks an option the variants pass."""
    cmd = [sys.executable, "-m", "mmsurgery", "verify", "--help"]
    r = subprocess.run(cmd, cwd=cwd, env={**env, "COLUMNS": "300"}, capture_output=True, text=True, check=False)
    known = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", r.stdout))
    missing = [o for o in options if o not in known]
    if r.returncode != 0 or missing:
        raise SystemExit(
            f"this tree's `mmsurgery verify` has no option {', '.join(missing) or '(--help failed)'}; it has "
            f'{" ".join(sorted(known))}. Pass the option\'s real name (--cache-option NAME, --extra-args "...").\n'
            + r.stderr[-2000:]
        )


def exit_text(row: dict[str, Any]) -> str:
    if row["timed_out"]:
        return "timeout"
    code = row["exit"]
    return str(code) if code >= 0 else signal.Signals(-code).name


def measure(v: Variant, work: Path, params: int, timeout: float | None) -> dict[str, Any]:
    if v.report is not None:
        v.report.unlink(missing_ok=True)
    if v.prepare is not None:
        v.prepare()
    subprocess.run(["sync"], check=True)
    log = work / f"log-{re.sub(r'[^a-z0-9]+', '-', v.name.lower()).strip('-')}.txt"
    pr = run_measured(v.cmd, cwd=work, env=v.env, log=log, timeout=timeout)
    row: dict[str, Any] = {
        "variant": v.name,
        "cmd": shlex.join(v.cmd),
        "exit": pr.exit_code,
        "timed_out": pr.timed_out,
        "wall": pr.wall,
        "peak_rss_mb": pr.peak_rss_kib / 1024,
        "params": params,
        "rss_bytes_per_param": pr.peak_rss_kib * 1024 / params,
    }
    if v.report is not None and v.report.exists():
        data = json.loads(v.report.read_text())
        row |= {"inside": data["seconds"], "passed": data["passed"], "failed": data["failed"]}
        row["stages"] = {s["name"]: {"seconds": s["seconds"], "status": s["status"]} for s in data["stages"]}
        row["messages"] = {s["name"]: s["message"] for s in data["stages"] if s["status"] == "fail"}
        onnx = next((s for s in data["stages"] if s["name"] == "onnx"), None)
        row["export"] = onnx["numbers"].get("export_seconds") if onnx else None
    if pr.exit_code != 0:
        row["output_tail"] = log.read_text(errors="replace")[-3000:]
    return row


def stage_cell(rows: list[dict[str, Any]], name: str) -> str:
    found = [r["stages"][name] for r in rows if name in r.get("stages", {})]
    if not found:
        return "-"
    cell = f"{statistics.median(s['seconds'] for s in found):.1f}"
    return cell + (" fail" if any(s["status"] == "fail" for s in found) else "")


def print_table(variants: list[Variant], base: str, before: str | None) -> None:
    cols = ["command", "exit", "wall (s)", "/ imports", "/ before", "peak RSS (MB)", "/ before", "RSS B/param"]
    cols += ["inside verify", *STAGES, "export"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    med = {v.name: {k: statistics.median(r[k] for r in v.rows) for k in ("wall", "peak_rss_mb")} for v in variants}
    for v in variants:
        rows, m = v.rows, med[v.name]
        ref = med.get(before) if before is not None and v.name != base else None
        exits = [exit_text(r) for r in rows]
        inside = [r["inside"] for r in rows if "inside" in r]
        export = [r["export"] for r in rows if r.get("export") is not None]
        cells = [
            v.name,
            exits[0] if len(set(exits)) == 1 else ", ".join(exits),
            spread([r["wall"] for r in rows], ".1f"),
            f"{m['wall'] / med[base]['wall']:.2f}",
            f"{m['wall'] / ref['wall']:.2f}" if ref else "-",
            spread([r["peak_rss_mb"] for r in rows], ".0f"),
            f"{m['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref else "-",
            f"{m['peak_rss_mb'] * 2**20 / rows[0]['params']:.2f}",
            f"{statistics.median(inside):.1f}" if inside else "-",
            *(stage_cell(rows, s) for s in STAGES),
            f"{statistics.median(export):.1f}" if export else "-",
        ]
        print("| " + " | ".join(cells) + " |")


def print_failures(size: str, variants: list[Variant]) -> None:
    for v in variants:
        for r in v.rows:
            if r["exit"] == 0:
                continue
            head = f"- {size}, {v.name}, round {r['round']}: exit {exit_text(r)} after {r['wall']:.1f} s"
            print(f"{head}, peak RSS {r['peak_rss_mb']:.0f} MB")
            if "failed" in r:
                for name in r["failed"]:
                    first = (r["messages"].get(name) or "").strip().splitlines()[:1]
                    print(f"  - failed stage {name}: {first[0] if first else '(no message)'}")
            else:
                tail = [line.strip()[:300] for line in r.get("output_tail", "").splitlines() if line.strip()][-2:]
                print("  - no JSON report; last output: " + (" / ".join(tail) or "(none)"))


def make_variants(
    gate: list[str],
    work: Path,
    here: dict[str, str],
    extra: list[str],
    before_env: dict[str, str] | None,
    before_name: str | None,
    cache_option: str | None,
) -> list[Variant]:
    """The baseline first, then the gate from this tree (with `extra`), from `--before`, and with the export cache."""
    report = [work / f"report-{i}.json" for i in range(5)]
    variants = [Variant(f"imports ({IMPORTS.removeprefix('import ')})", [sys.executable, "-c", IMPORTS], here)]
    variants.append(Variant("verify (this tree)", [*gate, "--json", str(report[0]), *extra], here, report[0]))
    if before_env is not None and before_name is not None:
        variants.append(Variant(before_name, [*gate, "--json", str(report[1])], before_env, report[1]))
    if cache_option is not None:
        cache = work / "export-cache"
        this = [*gate, cache_option, str(cache), *extra]

        def empty() -> None:
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()

        name = f"verify {cache_option}"
        # an entry binds only once two exports agreed (verify.export_cache): gate 1 and 2 export, gate 3 binds
        variants.append(Variant(f"{name}, 1st gate", [*this, "--json", str(report[2])], here, report[2], empty))
        variants.append(Variant(f"{name}, 2nd gate", [*this, "--json", str(report[3])], here, report[3]))
        variants.append(Variant(f"{name}, repeated", [*this, "--json", str(report[4])], here, report[4]))
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="vit_s", help=f"comma-separated, from {', '.join(VITS)}")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per size")
    ap.add_argument("--before", type=Path, help="another mmsurgery checkout to run the same command from")
    ap.add_argument(
        "--cache", action="store_true", help="add the export-cache variants (1st, 2nd, repeated gate) of this tree"
    )
    ap.add_argument("--cache-option", default="--export-cache", help="this tree's verify option taking the cache DIR")
    ap.add_argument("--extra-args", default="", help="more verify arguments for this tree's runs (not --before's)")
    ap.add_argument("--timeout", type=float, help="kill a run after this many seconds (recorded as a timeout)")
    ap.add_argument("--out", type=Path, help="write every raw row as a JSON line to this file")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmsurgery-bench")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in VITS]:
        ap.error(f"unknown sizes {unknown}; known: {', '.join(VITS)}")
    extra = shlex.split(args.extra_args)
    here = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args.dir.mkdir(parents=True, exist_ok=True)
    check_tree(here, args.dir, ROOT, "this tree")
    wanted = [a.split("=", 1)[0] for a in extra if a.startswith("--")] + ([args.cache_option] if args.cache else [])
    check_options(here, args.dir, wanted)
    before_env = before_name = None
    if args.before is not None:
        before_env = {**os.environ, "PYTHONPATH": str(args.before.resolve())}
        check_tree(before_env, args.dir, args.before, "--before")
        rev = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True)
        before_name = f"verify (before: {rev.stdout.decode().strip() or args.before})"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "mmsurgery"], capture_output=True)
    changed = len(dirty.stdout.splitlines())
    tree = f"this tree: {ROOT} at {head.stdout.strip()} + {changed} changed files under mmsurgery/"
    print(tree, file=sys.stderr)
    out = args.out.open("w") if args.out else None
    for size in sizes:
        work = args.dir / f"verify-{size}"
        work.mkdir(parents=True, exist_ok=True)
        built = build(size, work)
        steps = ", ".join(f"{k} {s:.1f} s" for k, s in built.seconds.items())
        done = f"built in {sum(built.seconds.values()):.1f} s ({steps})" if steps else "cached"
        print(f"{size}: {done}: {built.plain}, {built.trained}", file=sys.stderr)
        if out:
            out.write(json.dumps({"kind": "build", "size": size, "seconds": built.seconds}) + "\n")
        gate = [sys.executable, "-m", "mmsurgery", "verify", str(built.plain), "--against", str(built.trained)]
        gate += ["--onnx"] + ([] if built.heads_carried else ["--heads", str(VITS[size].heads)])

        variants = make_variants(
            gate, work, here, extra, before_env, before_name, args.cache_option if args.cache else None
        )
        base = variants[0].name
        for rnd in range(1, args.repeats + 1):
            for v in variants:
                row = {"kind": "run", "size": size, "round": rnd} | measure(v, work, built.params, args.timeout)
                v.rows.append(row)
                print(
                    f"[{size} round {rnd}/{args.repeats}] {v.name}: exit {exit_text(row)}, {row['wall']:.1f} s, "
                    f"{row['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                )
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
        gb = built.plain.stat().st_size / 1e9, built.trained.stat().st_size / 1e9
        spec = VITS[size]
        print(
            f"\n{size} (embed {spec.embed}, depth {spec.depth}, heads {spec.heads}, MLP {spec.mlp}, patch "
            f"{spec.patch}, {spec.img} px): PLAIN {built.params / 1e6:.1f} M parameters, {gb[0]:.2f} GB; PAIRED "
            f"{gb[1]:.2f} GB. Median of {args.repeats} interleaved rounds (min–max), `sync` before each; wall is the "
            "whole process; peak RSS is the child's ru_maxrss; stage seconds from the JSON report.\n"
        )
        print_table(variants, base, before_name)
        print_failures(size, variants)
    if out:
        out.close()
    print(f"\n{tree}\ncommand: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")


if __name__ == "__main__":
    main()
