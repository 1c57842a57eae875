"""`mmsurgery fold` as users run it: the console script, a fresh process per command, on paired files whose target
was written by mmsurgery's own writer, by `safetensors.torch.save_file` and by `transformers`' `save_pretrained`,
against issue 13's floor and the interpreter's start-up, interleaved, with per-round spread (issue 22, item 11).

    .venv/bin/python benchmarks/fold_cli.py [--size vit_l] [--rounds 7] [--inputs writer,save_file,save_pretrained]
        [--no-sync] [--replace] [--out rows.jsonl] [--dir DIR (default: <tempdir>/mmsurgery-bench)] [--clean]

Inputs, built once under `--dir`/fold-cli-<size>/ (in a child process) and reused while `build.json` matches;
`--size tiny` is for smoke tests:

    writer           target + aux from `common.make_vit` (mmsurgery's `SafetensorsWriter`, timm names and order)
    save_file        the same tensors (`common.vit_tensors`, same seeds) in a dict, `safetensors.torch.save_file`d
    save_pretrained  `ViTForImageClassification` of the same shape (hidden, layers, heads, intermediate, patch;
                     dtype float32, random init, seeds 0 and 1), `save_pretrained` into a model folder

each paired through the console script (`mmsurgery pair TARGET AUX -o PAIRED --init-scale 0.01 --json`; a model
folder for save_pretrained; every block linear must pair), the aux then removed. Per round, in an order rotated each
round, `sync` before each command (not with `--no-sync`), each output removed after its command, outside the timing
(with `--replace` kept instead, so the next run of the command overwrites it, as `-o OUT --force` and `cp` do when
OUT exists):

    start-up, one per input   python -c "import torch, mmsurgery.cli, mmsurgery.fold, ..." (all `mmsurgery fold`
                              imports: checked against sys.modules after a CLI fold); the round's baseline is their
                              median
    floor, per input          cat PAIRED > /dev/null; cp TARGET OUT; sync OUT (issue 13's; for a model folder, its
                              model.safetensors)
    fold, per input           mmsurgery fold PAIRED -o OUT --force: the console script, spawn to reap (`os.wait4`)
    fold.py method, per input `fold_file(PAIRED, OUT)` in a child, timed after its imports (benchmarks/fold.py's)

Reported per input: medians (min–max over rounds) and, over the same round's floor of that input, the median and
min–max of the per-round ratios, for the whole fold process, for it minus the round's start-up, and for fold.py's
method; and the layout of every file (where the data starts, the share of tensor bytes at page- and 64-byte-aligned
offsets, the tensor order, how many of fold's W_aux reads go backwards). `--out` writes every raw row as JSON lines.

Why a CLI harness said 3.5× and fold.py 0.64× (tiny runs, micro-measurements on this VM, and the code):
- Start-up. fold.py times fold after its imports; a harness around the CLI times the whole process, ~2 s of
  interpreter + torch + typer/rich imports here (1.9–2.6 s in the tiny runs; docs: 1.85–2.4 s), against a ViT-L
  floor of ~1 s. 0.64–0.9× after imports plus ~2× of start-up is ~3×: the issue's 3.5×. Both are right; one is the
  fold's own I/O, the other what a user waits for. The table gives both, from the same rounds.
- Not the target's layout. fold reads only PAIRED, and `pair` writes PAIRED for all three inputs; the target's
  writer changes PAIRED's tensor order, nothing else (tiny: paired files of the writer and save_file inputs have the
  same size, data start 7704 and alignment). save_file orders by dtype then name (`blocks.10` before `blocks.2`);
  `pair` keeps the target's order and writes W_aux in its plan's order, so some of fold's W_aux reads go backwards
  — in a file the floor's `cat` has just put in the page cache. Data offsets are 8-byte aligned only, in every
  writer's files (the header is padded to 8 bytes): none is page-aligned, and the torch buffer `pread` fills sits at
  64 mod 4096 anyway. Measured: hot `preadv` of 128 MiB at file offsets 0, 8, 24, 2704, 3608 mod 4096: 7.4–7.7 GB/s
  each; 128 MiB of 256 KiB writes after a 0, 2704 or 4096-byte header: 37–43 ms, fsync 93–102 ms.
- Not the `sync` before each command. Every command fsyncs what it writes, so no dirty pages carry over; freeing a
  removed output's pages happens in the unlink call itself (1 GiB: 272–288 ms in `unlink`, 3–9 ms in a `sync` after
  it), which is outside the timing here; a 1 MiB write + fsync right after unlinking 512 MiB took 2–3 ms with or
  without a `sync` between.
- But an existing OUT is torn down inside the timed command: `fold --force` publishes with `os.replace`, and
  renaming over a 1 GiB file took 334–370 ms (to a free name: 0 ms); `cp` over it truncates it (O_TRUNC) the same
  way. A harness that leaves OUT in place between rounds charges both ~0.4 s per ViT-L output; `--replace`
  measures that. Otherwise the output's durability costs the same: fold fsyncs the file (and its folder), the floor
  `sync OUT`s the file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import VITS, make_vit, run_child, run_measured, spread, vit_tensors

ROOT = Path(__file__).resolve().parents[1]
BUILD_VERSION = 1
IMPORTS = "import torch, mmsurgery.cli, mmsurgery.fold, mmsurgery.render, mmsurgery.checkpoint.formats.dcp_folder"
LABELS = {
    "writer": "mmsurgery SafetensorsWriter",
    "save_file": "safetensors save_file",
    "save_pretrained": "transformers save_pretrained",
}


@dataclass(frozen=True)
class Input:
    key: str
    work: Path

    @property
    def folder(self) -> bool:
        return self.key == "save_pretrained"

    def path(self, role: str) -> Path:
        """`target`, `aux` or `paired`: a .safetensors file, or a model folder for save_pretrained."""
        return self.work / (role if self.folder else f"{role}.safetensors")

    def weights(self, role: str) -> Path:
        """The safetensors file of `role` (what the floor reads or copies)."""
        return self.path(role) / "model.safetensors" if self.folder else self.path(role)


def hf_vit(folder: Path, size: str, seed: int) -> None:
    """A randomly initialised `ViTForImageClassification` of `VITS[size]`'s shape, `save_pretrained` as is."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.utils import logging

    logging.disable_progress_bar()
    s = VITS[size]
    config = ViTConfig(
        hidden_size=s.embed,
        num_hidden_layers=s.depth,
        num_attention_heads=s.heads,
        intermediate_size=s.mlp,
        patch_size=s.patch,
        image_size=s.img,
        num_labels=s.classes,
        dtype="float32",
    )
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(folder)


def write_target(inp: Input, role: str, size: str, seed: int) -> None:
    if inp.key == "writer":
        make_vit(inp.path(role), size, seed)
    elif inp.key == "save_file":
        from safetensors.torch import save_file

        save_file(dict(vit_tensors(size, seed)), str(inp.path(role)))
    else:
        hf_vit(inp.path(role), size, seed)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def build(inp: Input, size: str, cli: Path) -> dict[str, Any]:
    """Target, aux, `mmsurgery pair` through the console script; the aux removed. Cached by `build.json`."""
    stamp = inp.work / "build.json"
    want = {"version": BUILD_VERSION, "size": asdict(VITS[size])}
    if stamp.exists() and inp.path("paired").exists() and inp.path("target").exists():
        info = json.loads(stamp.read_text())
        if info["key"] == want:
            return info | {"cached": True}
    shutil.rmtree(inp.work, ignore_errors=True)
    inp.work.mkdir(parents=True)
    seconds: dict[str, float] = {}
    for role, seed in (("target", 0), ("aux", 1)):
        t0 = time.perf_counter()
        write_target(inp, role, size, seed)
        seconds[role] = time.perf_counter() - t0
    out = str(inp.path("paired")) + ("/" if inp.folder else "")
    cmd = [str(cli), "pair", str(inp.path("target")), str(inp.path("aux")), "-o", out]
    cmd += ["--init-scale", "0.01", "--force", "--json", "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds["pair"] = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    plan = json.loads(r.stdout)
    expect = VITS[size].depth * (6 if inp.folder else 4)  # HF ViT: q, k, v apart; timm: one qkv
    if plan["skipped"] or plan["paired"] != expect:
        raise SystemExit(f"{inp.key}: pair paired {plan['paired']} linears, skipped {plan['skipped']}; want {expect}")
    gb = {role: inp.weights(role).stat().st_size / 1e9 for role in ("target", "aux", "paired")}
    remove(inp.path("aux"))
    info = {"key": want, "seconds": seconds, "gb": gb, "paired_linears": plan["paired"], "pair_cmd": shlex.join(cmd)}
    stamp.write_text(json.dumps(info, indent=1) + "\n")
    return info | {"cached": False}


def build_in_child(inp: Input, size: str, cli: Path) -> dict[str, Any]:
    """`build` in a fresh interpreter: this process must stay small, because Linux starts a spawned child's peak
    RSS (`ru_maxrss`, what `run_measured` reports) at the spawning parent's peak (a ViT-L `save_file` holds
    1.2 GB and more), so every fold after it would report at least that."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
        f"from fold_cli import Input, build; "
        f"print(json.dumps(build(Input({inp.key!r}, Path({str(inp.work)!r})), {size!r}, Path({str(cli)!r}))))"
    )
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"building the {inp.key} input failed (exit {r.returncode}); see above")
    return json.loads(r.stdout.strip().splitlines()[-1])


def layout(path: Path, size: str) -> dict[str, Any]:
    """Where a safetensors file's tensors lie: the data section's start and its alignment, the share of tensor
    bytes at page- (4096) and cache-line- (64) aligned file offsets, the tensor order, and for a paired file how
    often fold's W_aux reads (in fold's order: the W's file order) go backwards in the file."""
    from mmsurgery.checkpoint.safetensors_header import read_header

    h = read_header(path)
    entries = sorted(h.entries.values(), key=lambda e: e.begin)
    total = sum(e.end - e.begin for e in entries) or 1

    def share(align: int) -> float:
        return sum(e.end - e.begin for e in entries if (h.data_start + e.begin) % align == 0) / total

    aux = {e.name.removesuffix(".aux_weight"): e for e in entries if e.name.endswith(".aux_weight")}
    own = [e.name for e in entries if not e.name.endswith((".aux_weight", ".cross_modal_scale"))]
    aux_seq = [aux[n.removesuffix(".weight")].begin for n in own if n.removesuffix(".weight") in aux]
    order = "by name" if own == sorted(own) else "other"
    if own == list(VITS[size].shapes()):
        order = "timm's (make_vit's)"
    return {
        "file": str(path),
        "bytes": h.file_size,
        "tensors": len(entries),
        "data_start": h.data_start,
        "data_start_mod_4096": h.data_start % 4096,
        "data_start_mod_64": h.data_start % 64,
        "page_aligned_share": share(4096),
        "line_aligned_share": share(64),
        "order": order,
        "first": own[:3],
        "aux_reads": len(aux_seq),
        "aux_backward": sum(b < a for a, b in itertools.pairwise(aux_seq)),
    }


@dataclass
class Variant:
    name: str
    method: str  # startup, floor, cli, inproc
    input: str | None
    measure: Callable[[], dict[str, Any]]
    output: Path | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


def make_variants(inputs: list[Input], cli: Path, work: Path) -> list[Variant]:
    py = sys.executable
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)

    def startup() -> dict[str, Any]:
        log = work / "log-startup.txt"
        pr = run_measured([py, "-c", IMPORTS], cwd=work, log=log)
        row = {"wall": pr.wall, "peak_rss_mb": pr.peak_rss_kib / 1024, "exit": pr.exit_code}
        return row | ({"output_tail": log.read_text(errors="replace")[-2000:]} if pr.exit_code else {})

    variants = []
    for inp in inputs:
        floor_out = out_dir / f"floor-{inp.key}.safetensors"
        fold_out = out_dir / f"cli-{inp.key}{'' if inp.folder else '.safetensors'}"
        child_out = out_dir / f"inproc-{inp.key}{'' if inp.folder else '.safetensors'}"

        def floor(inp: Input = inp, out: Path = floor_out) -> dict[str, Any]:
            t0 = time.perf_counter()
            subprocess.run(["cat", str(inp.weights("paired"))], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["cp", str(inp.weights("target")), str(out)], check=True)
            subprocess.run(["sync", str(out)], check=True)
            return {"wall": time.perf_counter() - t0, "exit": 0}

        def fold(inp: Input = inp, out: Path = fold_out) -> dict[str, Any]:
            arg = str(out) + ("/" if inp.folder else "")
            log = work / f"log-cli-{inp.key}.txt"
            pr = run_measured([str(cli), "fold", str(inp.path("paired")), "-o", arg, "--force"], cwd=work, log=log)
            row = {"wall": pr.wall, "peak_rss_mb": pr.peak_rss_kib / 1024, "exit": pr.exit_code}
            return row | ({"output_tail": log.read_text(errors="replace")[-2000:]} if pr.exit_code else {})

        def inproc(inp: Input = inp, out: Path = child_out) -> dict[str, Any]:
            body = f"fold_file({str(inp.path('paired'))!r}, {str(out)!r}, force=True)"
            try:
                r = run_child("from mmsurgery.fold import fold_file", body)
            except subprocess.CalledProcessError as e:
                return {"wall": float("nan"), "exit": e.returncode, "output_tail": (e.stderr or "")[-2000:]}
            return {
                "wall": r["process_seconds"],
                "after_imports": r["seconds"],
                "peak_rss_mb": r["rss_mb"],
                "anon_mb": r["anon_mb"],
                "exit": 0,
            }

        variants += [
            Variant(f"start-up #{len(variants) // 4 + 1}", "startup", None, startup),
            Variant(f"floor ({inp.key})", "floor", inp.key, floor, floor_out),
            Variant(f"mmsurgery fold ({inp.key})", "cli", inp.key, fold, fold_out),
            Variant(f"fold.py method ({inp.key})", "inproc", inp.key, inproc, child_out),
        ]
    return variants


def summarize(variants: list[Variant], inputs: list[Input]) -> list[dict[str, Any]]:
    """Per input, per round: the fold's whole process, it minus the round's start-up (the median of the round's
    start-up runs, one per input), and fold.py's after-imports time, each over the round's floor of the same input;
    rounds where any of them failed are left out."""
    by = {(v.method, v.input): {r["round"]: r for r in v.rows if r["exit"] == 0} for v in variants if v.input}
    ups: dict[int, list[float]] = {}
    for v in variants:
        for r in v.rows:
            if v.method == "startup" and r["exit"] == 0:
                ups.setdefault(r["round"], []).append(r["wall"])
    start = {rnd: {"wall": statistics.median(w)} for rnd, w in ups.items()}
    out = []
    for inp in inputs:
        floor, cli, child = by[("floor", inp.key)], by[("cli", inp.key)], by[("inproc", inp.key)]
        rounds = sorted(set(floor) & set(cli) & set(start) & set(child))
        f = {r: floor[r]["wall"] for r in rounds}
        minus = {r: cli[r]["wall"] - start[r]["wall"] for r in rounds}
        x: dict[str, Any] = {"input": inp.key, "rounds": rounds, "floor": list(f.values())}
        x["startup"] = [start[r]["wall"] for r in rounds]
        x["fold"] = [cli[r]["wall"] for r in rounds]
        x["fold_minus_startup"] = list(minus.values())
        x["inproc_after_imports"] = [child[r]["after_imports"] for r in rounds]
        x["inproc_whole"] = [child[r]["wall"] for r in rounds]
        x["fold_rss_mb"] = [cli[r]["peak_rss_mb"] for r in rounds]
        x["ratio"] = [cli[r]["wall"] / f[r] for r in rounds]
        x["ratio_minus_startup"] = [minus[r] / f[r] for r in rounds]
        x["ratio_inproc"] = [child[r]["after_imports"] / f[r] for r in rounds]
        x["startup_ratio"] = [start[r]["wall"] / f[r] for r in rounds]
        x["cli_extra"] = [minus[r] - child[r]["after_imports"] for r in rounds]
        out.append(x)
    base = next((x for x in out if x["input"] == "writer"), None)
    for x in out:
        med = statistics.median
        if not x["rounds"]:
            x["explanation"] = "no round where every command succeeded"
            continue
        text = (
            f"start-up is {med(x['startup_ratio']):.2f}× of the {med(x['ratio']):.2f}×; "
            f"after it, CLI − fold.py method {med(x['cli_extra']):+.2f} s"
        )
        if base is not None and x is not base:
            theirs = {r: base["ratio_minus_startup"][i] for i, r in enumerate(base["rounds"])}
            diff = [v - theirs[r] for r, v in zip(x["rounds"], x["ratio_minus_startup"], strict=True) if r in theirs]
            if diff:
                text += f"; vs writer's input {med(diff):+.2f}× floor ({min(diff):+.2f} to {max(diff):+.2f})"
        x["explanation"] = text
    return out


def print_layouts(layouts: list[dict[str, Any]]) -> None:
    cols = ["file", "MB", "tensors", "data start (B)", "mod 4096", "mod 64", "bytes page-aligned", "64-aligned"]
    cols += ["order", "W_aux reads going backward"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for x in layouts:
        back = f"{x['aux_backward']} of {x['aux_reads']}" if x["aux_reads"] else "-"
        print(
            f"| {x['name']} | {x['bytes'] / 1e6:.1f} | {x['tensors']} | {x['data_start']} | "
            f"{x['data_start_mod_4096']} | {x['data_start_mod_64']} | {x['page_aligned_share']:.0%} | "
            f"{x['line_aligned_share']:.0%} | {x['order']}: {', '.join(x['first'])}, … | {back} |"
        )


def print_table(summary: list[dict[str, Any]]) -> None:
    cols = ["target written by", "floor (s)", "fold, whole process (s)", "÷ floor", "fold − start-up (s)"]
    cols += ["÷ floor", "fold.py method: after imports (s)", "÷ floor", "fold.py method: whole process (s)"]
    cols += ["fold peak RSS (MB)", "explanation"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for x in summary:
        cells = [LABELS[x["input"]], spread(x["floor"]), spread(x["fold"]), spread(x["ratio"])]
        cells += [spread(x["fold_minus_startup"]), spread(x["ratio_minus_startup"])]
        cells += [spread(x["inproc_after_imports"]), spread(x["ratio_inproc"]), spread(x["inproc_whole"])]
        cells += [spread(x["fold_rss_mb"], ".0f"), x["explanation"]]
        print("| " + " | ".join(cells) + " |")


def check_cli(cli: Path, work: Path) -> None:
    """The console script runs this interpreter, and this interpreter imports this checkout's mmsurgery."""
    if not cli.is_file():
        raise SystemExit(f"{cli}: no console script beside {sys.executable} (pip install -e . in the venv)")
    shebang = cli.read_bytes().split(b"\n", 1)[0].decode(errors="replace").removeprefix("#!").strip()
    if Path(shebang).resolve() != Path(sys.executable).resolve():
        raise SystemExit(f"{cli} runs {shebang}, not {sys.executable}")
    code = "import mmsurgery; print(mmsurgery.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=True)
    if not Path(r.stdout.strip()).resolve().is_relative_to(ROOT):
        raise SystemExit(f"{sys.executable} imports {r.stdout.strip()}, not the checkout {ROOT}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(VITS), default="vit_l")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--inputs", default=",".join(LABELS), help=f"comma-separated, from {', '.join(LABELS)}")
    ap.add_argument("--no-sync", action="store_true", help="no `sync` before each command (fold.py's setting)")
    ap.add_argument("--replace", action="store_true", help="keep each output: the next run of the command replaces it")
    ap.add_argument("--out", type=Path, help="write every raw row as a JSON line to this file")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmsurgery-bench")
    ap.add_argument("--clean", action="store_true", help="remove the inputs at the end (default: kept for reuse)")
    args = ap.parse_args()
    keys = args.inputs.split(",")
    if unknown := [k for k in keys if k not in LABELS]:
        ap.error(f"unknown inputs {unknown}; known: {', '.join(LABELS)}")
    work = args.dir / f"fold-cli-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    cli = Path(sys.executable).with_name("mmsurgery")
    check_cli(cli, work)
    out = args.out.open("w") if args.out else None

    def emit(row: dict[str, Any]) -> None:
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    inputs = [Input(k, work / k) for k in keys]
    layouts = []
    for inp in inputs:
        info = build_in_child(inp, args.size, cli)
        how = "cached" if info["cached"] else ", ".join(f"{k} {s:.1f} s" for k, s in info["seconds"].items())
        print(f"{inp.key}: {how}; {info['paired_linears']} linears paired", file=sys.stderr)
        emit({"kind": "build", "size": args.size, "input": inp.key} | info)
        for role in ("target", "paired"):
            row = {"name": f"{role} ({inp.key})"} | layout(inp.weights(role), args.size)
            layouts.append(row)
            emit({"kind": "layout", "size": args.size, "input": inp.key, "role": role} | row)
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,OPTIONS", "-T", str(work)], capture_output=True, text=True)

    variants = make_variants(inputs, cli, work)
    for inp in inputs:  # warm: the inputs in the page cache, torch's files too
        for role in ("target", "paired"):
            subprocess.run(["cat", str(inp.weights(role))], check=True, stdout=subprocess.DEVNULL)
    variants[0].measure()  # torch's files in the page cache
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(variants)
        for pos, v in enumerate(variants[k:] + variants[:k]):
            if not args.no_sync:
                subprocess.run(["sync"], check=True)
            row = {"kind": "run", "size": args.size, "round": rnd, "position": pos, "variant": v.name}
            row |= {"method": v.method, "input": v.input} | v.measure()
            if v.output is not None and not args.replace:
                remove(v.output)
            v.rows.append(row)
            emit(row)
            extra = f", {row['after_imports']:.2f} s after imports" if "after_imports" in row else ""
            print(
                f"[round {rnd}/{args.rounds}] {v.name}: exit {row['exit']}, {row['wall']:.2f} s{extra}", file=sys.stderr
            )
    summary = summarize(variants, inputs)
    hwm = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    emit({"kind": "harness", "peak_rss_mb": hwm, "filesystem": fs.stdout.strip()})
    for x in summary:
        emit({"kind": "summary", "size": args.size} | x)

    spec = VITS[args.size]
    start = [r["wall"] for v in variants if v.method == "startup" for r in v.rows if r["exit"] == 0]
    print(
        f"\n{args.size} (embed {spec.embed}, depth {spec.depth}, MLP {spec.mlp}, patch {spec.patch}), float32, "
        f"{args.rounds} interleaved rounds, order rotated, {'no sync' if args.no_sync else '`sync` before each'}, "
        f"{'outputs replaced by the next run' if args.replace else 'outputs removed after each command'}; "
        f"{work}: {fs.stdout.strip() or '?'}\n\nLayout of the files (fold reads only PAIRED; the floor copies TARGET):\n"
    )
    print_layouts(layouts)
    print(f'\nstart-up (`python -c "{IMPORTS}"`): {spread(start)} s\n')
    print(
        "Seconds: median (min–max over rounds); ÷ floor: median of the per-round ratios (min–max); fold − start-up:"
        " minus the median of the round's start-ups; peak RSS: the console script's `ru_maxrss` (at least this "
        f"harness's own peak, {hwm:.0f} MB: Linux counts the spawning parent's).\n"
    )
    print_table(summary)
    for v in variants:
        for r in v.rows:
            if r["exit"] != 0:
                print(f"- round {r['round']}, {v.name}: exit {r['exit']}: {r.get('output_tail', '')[-300:]}")
    if out:
        out.close()
    shutil.rmtree(work / "out", ignore_errors=True)  # --replace leaves every output (9 at ViT-L: 11 GB)
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ncommand: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")


if __name__ == "__main__":
    main()
