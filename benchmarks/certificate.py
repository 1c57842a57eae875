"""`mmsurgery verify PLAIN --certificate CERT --stages weights` as users run it (the gate without PAIRED): the
console script, a fresh process per command, against `sha256sum PLAIN` and the console script's start-up,
interleaved, with per-round spread (issue 24: "reads PLAIN once, at ≤ 1.3× `sha256sum PLAIN` wall after start-up,
flat memory, at any model size; a ViT-L certificate under 1 MB").

    .venv/bin/python benchmarks/certificate.py [--size vit_l] [--rounds 5] [--out rows.jsonl]
        [--dir DIR (default: <tempdir>/mmsurgery-bench)] [--clean]

Inputs, built once under `--dir`/certificate-<size>/ (in a child process, never a whole model in this one) and
reused while `build.json` matches, as benchmarks/verify.py builds its files: target and aux written tensor by
tensor (`common.make_vit`, timm init, the `mmsurgery.vit` config in the metadata), `mmsurgery.pairing.pair`, the
paired file streamed "as training leaves it" (`verify.train_like`: λ ~ N(0, 0.3²) per pathway, every other tensor
moved by 0.01·N(0, 1)), folded once by `fold_file(TRAINED, PLAIN, certificate=CERT)`; then

    writer     PLAIN as `fold` wrote it (mmsurgery's `SafetensorsWriter`, timm's tensor order)
    save_file  the same tensors and metadata, `safetensors.torch.load_file(PLAIN)` then `save_file`d (another
               library's file: tensors ordered by dtype, then name)

and the same for `--size tiny` under certificate-tiny/ (the start-up probe). The paired files are removed.

Per round, in an order rotated each round, `sync` before each command:

    start-up              python -c "import torch, mmsurgery.cli, mmsurgery.verify, mmsurgery.render" (what a
                          verify needs to run at all, as fold_cli.py measures fold's start-up; the modules the
                          certificate gate loads beyond it are listed, from sys.modules after an in-process run)
    verify, tiny model    mmsurgery verify TINY_PLAIN --certificate TINY_CERT --stages weights --json R: the console
                          script's whole fixed cost (start-up and everything that does not grow with PLAIN)
    sha256sum, per input  sha256sum PLAIN (the issue's baseline)
    openssl, per input    openssl dgst -sha256 PLAIN (when openssl is on PATH): a second floor, because coreutils'
                          sha256sum may not use the CPU's SHA instructions while OpenSSL, and so Python's hashlib
                          that verify hashes with, does (on the VM this was written on: 0.3 vs 1.2 GB/s)
    verify, per input     mmsurgery verify PLAIN --certificate CERT --stages weights --json R (the console script,
                          spawn to reap; the JSON report gives the weights stage's own seconds and proves it passed)

Every command runs through `common.run_measured` (no shell; wall from spawn to reap, peak RSS = `ru_maxrss` from
`os.wait4`). A verify that exits non-zero, or whose weights stage did not pass, stops the benchmark with its output.

Reported per input: medians over rounds (min–max), and the median and min–max of the per-round ratios to the same
round's `sha256sum` of that input: for the whole verify process, for it minus the start-up median (over all
rounds), minus the tiny verify's median, and for the weights stage alone; the verify's peak RSS, and that over the
tiny verify's (what PLAIN's size adds: flat memory means it stays near 2 × the largest tensor, the weights stage's
two read buffers, at every size); CERT's size; every command with its median wall and peak RSS, as run.
`--out` writes every raw row as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import VITS, make_vit, run_measured, run_steps, spread

ROOT = Path(__file__).resolve().parents[1]
BUILD_VERSION = 1  # bump when the files change, so cached ones are rebuilt
IMPORTS = "import torch, mmsurgery.cli, mmsurgery.verify, mmsurgery.render"
LABELS = {"writer": "mmsurgery fold (SafetensorsWriter)", "save_file": "safetensors save_file"}
PLAINS = {"writer": "plain.safetensors", "save_file": "plain-save_file.safetensors"}
CERT = "plain.certificate.json"
GOAL_RATIO = 1.3  # issue 24: ≤ 1.3× sha256sum PLAIN after start-up
GOAL_CERT_BYTES = 1_000_000  # issue 24: a ViT-L certificate under 1 MB


# ---- inputs -------------------------------------------------------------------------------------------------
def build(size: str, work: Path) -> dict[str, Any]:
    """PLAIN (fold's), CERT and PLAIN re-saved by `safetensors.torch.save_file`, from a trained-looking paired file
    of `VITS[size]` (benchmarks/verify.py's recipe). Cached by `build.json`; at most PAIRED twice on disk."""
    stamp = work / "build.json"
    want = {"version": BUILD_VERSION, "size": asdict(VITS[size])}
    files = [work / PLAINS["writer"], work / PLAINS["save_file"], work / CERT]
    if stamp.exists() and all(f.exists() for f in files):
        info = json.loads(stamp.read_text())
        if info["key"] == want:
            return info | {"cached": True}
    import torch
    from verify import train_like

    from mmsurgery.fold import fold_file
    from mmsurgery.models.vit import METADATA_KEY
    from mmsurgery.pairing import pair

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = VITS[size]
    target, aux, paired, trained = (work / f"{r}.safetensors" for r in ("target", "aux", "paired", "trained"))
    plain, resaved, cert = files
    meta = {METADATA_KEY: json.dumps(spec.vit_config())}
    folded: dict[str, Any] = {}

    def fold() -> None:
        folded["result"] = fold_file(trained, plain, force=True, certificate=cert)

    def resave() -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(plain), "pt") as f:
            metadata = f.metadata()
        save_file(load_file(str(plain)), str(resaved), metadata=metadata)

    steps: list[tuple[str, Callable[[], object], tuple[Path, ...]]] = [  # step, then the files it frees
        ("target", lambda: make_vit(target, size, 0, timm_init=True, metadata=meta), ()),
        ("aux", lambda: make_vit(aux, size, 1, timm_init=True, metadata=meta), ()),
        ("pair", lambda: pair(target, aux, paired, force=True), (target, aux)),
        ("train_like", lambda: train_like(paired, trained), (paired,)),
        ("fold", fold, (trained,)),
        ("save_file", resave, ()),
    ]
    seconds, gb = run_steps(steps)
    lams = [abs(x) for v in folded["result"].scales.values() for x in _flat(v)]
    if not lams or min(lams) == 0.0:
        raise SystemExit(f"{size}: the fold's λ are not all non-zero ({len(lams)} λ, min |λ| {min(lams, default=0)})")
    info = {
        "key": want,
        "seconds": seconds,
        "gb": gb,
        "folded_layers": len(folded["result"].scales),
        "lambda_abs": {"min": min(lams), "median": statistics.median(lams), "max": max(lams)},
        "torch": torch.__version__,
    }
    stamp.write_text(json.dumps(info, indent=1) + "\n")
    return info | {"cached": False}


def _flat(v: Any) -> list[float]:
    return [x for item in v for x in _flat(item)] if isinstance(v, list) else [float(v)]


def build_in_child(size: str, work: Path) -> dict[str, Any]:
    """`build` in a fresh interpreter: this process must stay small, because Linux starts a spawned child's peak
    RSS (`ru_maxrss`, what `run_measured` reports) at the spawning parent's peak (`load_file` of a ViT-L holds
    1.2 GB), so every verify after it would report at least that."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
        f"from certificate import build; print(json.dumps(build({size!r}, Path({str(work)!r}))))"
    )
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"building the {size} inputs failed (exit {r.returncode}); see above")
    return json.loads(r.stdout.strip().splitlines()[-1])


def header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (JSON), read without torch: this process stays small."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)) | {"__data_start__": 8 + n}


def layout(path: Path, size: str) -> dict[str, Any]:
    h = header(path)
    entries = sorted(((k, v) for k, v in h.items() if not k.startswith("__")), key=lambda kv: kv[1]["data_offsets"][0])
    names = [k for k, _ in entries]
    order = "timm's (make_vit's)" if names == list(VITS[size].shapes()) else "other"
    order = "by name" if names == sorted(names) else order
    return {
        "bytes": path.stat().st_size,
        "tensors": len(entries),
        "data_start": h["__data_start__"],
        "largest_tensor": max(v["data_offsets"][1] - v["data_offsets"][0] for _, v in entries),
        "order": order,
        "first": names[:3],
    }


# ---- checks -------------------------------------------------------------------------------------------------
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


def modules_beyond_startup(cli: Path, args: list[str], work: Path) -> list[str]:
    """Modules the console script has loaded after `args` (run in-process, as the script itself) that `IMPORTS`
    does not load: what the start-up line leaves out of the verify's fixed cost."""
    dump = "import json, sys; print(json.dumps(sorted(sys.modules)))"
    run = (
        f"import runpy, sys; sys.argv = {[str(cli), *args]!r}\n"
        f"try:\n    runpy.run_path({str(cli)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n{dump}"
    )
    found = []
    for code in (run, f"{IMPORTS}\n{dump}"):
        r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"python -c {code!r} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        found.append(set(json.loads(r.stdout.strip().splitlines()[-1])))
    return sorted(found[0] - found[1])


def module_groups(names: list[str], top: int = 8) -> str:
    """`torch._dynamo` (412), `sympy` (370), ...: the packages (torch's by subpackage) the modules belong to."""
    groups = Counter(".".join(n.split(".")[:2]) if n.startswith("torch.") else n.split(".")[0] for n in names)
    shown = ", ".join(f"{g} ({c})" for g, c in groups.most_common(top))
    return shown + (f", and {len(groups) - top} more" if len(groups) > top else "")


# ---- runs ---------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    method: str  # startup, tiny, sha256sum, openssl, verify
    input: str | None
    cmd: list[str]
    report: Path | None = None  # the verify's --json report
    rows: list[dict[str, Any]] = field(default_factory=list)


def verify_cmd(cli: Path, plain: Path, cert: Path, report: Path) -> list[str]:
    return [str(cli), "verify", str(plain), "--certificate", str(cert), "--stages", "weights", "--json", str(report)]


def make_variants(cli: Path, work: Path, tiny: Path, keys: list[str]) -> list[Variant]:
    openssl = shutil.which("openssl")
    variants = [
        Variant("start-up", "startup", None, [sys.executable, "-c", IMPORTS]),
        Variant(
            "verify, tiny model",
            "tiny",
            None,
            verify_cmd(cli, tiny / PLAINS["writer"], tiny / CERT, work / "report-tiny.json"),
            work / "report-tiny.json",
        ),
    ]
    for key in keys:
        plain, report = work / PLAINS[key], work / f"report-{key}.json"
        variants.append(Variant(f"sha256sum ({key})", "sha256sum", key, ["sha256sum", str(plain)]))
        if openssl is not None:
            cmd = [openssl, "dgst", "-sha256", str(plain)]
            variants.append(Variant(f"openssl sha256 ({key})", "openssl", key, cmd))
        variants.append(Variant(f"verify ({key})", "verify", key, verify_cmd(cli, plain, work / CERT, report), report))
    return variants


def measure(v: Variant, work: Path) -> dict[str, Any]:
    """One run of `v`; stops the benchmark when a command fails or a verify's weights stage does not pass."""
    if v.report is not None:
        v.report.unlink(missing_ok=True)
    log = work / f"log-{re.sub(r'[^a-z0-9]+', '-', v.name.lower()).strip('-')}.txt"
    pr = run_measured(v.cmd, cwd=work, log=log)
    row: dict[str, Any] = {"wall": pr.wall, "peak_rss_mb": pr.peak_rss_kib / 1024, "exit": pr.exit_code}
    problem = f"exit {pr.exit_code}" if pr.exit_code != 0 else None
    if v.report is not None and problem is None:
        data = json.loads(v.report.read_text()) if v.report.exists() else {}
        stage = next((s for s in data.get("stages", []) if s["name"] == "weights"), None)
        if stage is None or stage["status"] != "pass":
            problem = f"weights stage {stage['status'] if stage else 'missing'} in {v.report}"
        else:
            row |= {"inside": data["seconds"], "weights_seconds": stage["seconds"]}
            row["identical_bytes"] = stage["numbers"].get("identical_bytes")
    if problem is not None:
        tail = log.read_text(errors="replace")[-4000:]
        print(f"{shlex.join(v.cmd)}: {problem}; its output:\n{tail}", file=sys.stderr)
        raise SystemExit(f"{v.name}: {problem}")
    return row


# ---- report -------------------------------------------------------------------------------------------------
def summarize(variants: list[Variant], keys: list[str]) -> list[dict[str, Any]]:
    """Per input, per round: the verify's wall, it minus the start-up median and minus the tiny verify's median,
    and its weights stage, each over the same round's sha256sum of that input."""
    by = {(v.method, v.input): {r["round"]: r for r in v.rows} for v in variants}
    startup = statistics.median(r["wall"] for r in by[("startup", None)].values())
    tiny = statistics.median(r["wall"] for r in by[("tiny", None)].values())
    tiny_rss = statistics.median(r["peak_rss_mb"] for r in by[("tiny", None)].values())
    out = []
    for key in keys:
        sha, ver = by[("sha256sum", key)], by[("verify", key)]
        rounds = sorted(set(sha) & set(ver))
        s = [sha[r]["wall"] for r in rounds]
        w = [ver[r]["wall"] for r in rounds]
        stage = [ver[r]["weights_seconds"] for r in rounds]
        x: dict[str, Any] = {"input": key, "rounds": rounds, "sha256sum": s, "verify": w, "weights_stage": stage}
        x["startup_median"], x["tiny_median"] = startup, tiny
        x["minus_startup"] = [v - startup for v in w]
        x["minus_tiny"] = [v - tiny for v in w]
        x["ratio"] = [v / b for v, b in zip(w, s, strict=True)]
        x["ratio_minus_startup"] = [v / b for v, b in zip(x["minus_startup"], s, strict=True)]
        x["ratio_minus_tiny"] = [v / b for v, b in zip(x["minus_tiny"], s, strict=True)]
        x["ratio_stage"] = [v / b for v, b in zip(stage, s, strict=True)]
        x["rss_mb"] = [ver[r]["peak_rss_mb"] for r in rounds]
        x["rss_over_tiny_mb"] = [v - tiny_rss for v in x["rss_mb"]]
        x["identical_bytes"] = ver[rounds[0]]["identical_bytes"] if rounds else None
        if ("openssl", key) in by:
            o = by[("openssl", key)]
            x["openssl"] = [o[r]["wall"] for r in rounds]
            x["ratio_openssl"] = [v / b for v, b in zip(w, x["openssl"], strict=True)]
            x["ratio_minus_tiny_openssl"] = [v / b for v, b in zip(x["minus_tiny"], x["openssl"], strict=True)]
            x["ratio_stage_openssl"] = [v / b for v, b in zip(stage, x["openssl"], strict=True)]
        out.append(x)
    return out


def print_layouts(layouts: dict[str, dict[str, Any]]) -> None:
    cols = ["PLAIN written by", "MB", "tensors", "data start (B)", "largest tensor (MB)", "order"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for key, x in layouts.items():
        print(
            f"| {LABELS[key]} | {x['bytes'] / 1e6:.1f} | {x['tensors']} | {x['data_start']} | "
            f"{x['largest_tensor'] / 1e6:.1f} | {x['order']}: {', '.join(x['first'])}, … |"
        )


def print_table(summary: list[dict[str, Any]]) -> None:
    cols = ["PLAIN written by", "sha256sum PLAIN (s)", "verify, whole process (s)", "÷ sha256sum"]
    cols += ["verify − start-up (s)", "÷ sha256sum", "verify − tiny verify (s)", "÷ sha256sum"]
    cols += ["weights stage (s)", "÷ sha256sum", "verify peak RSS (MB)", "− tiny verify's (MB)"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for x in summary:
        cells = [LABELS[x["input"]], spread(x["sha256sum"]), spread(x["verify"]), spread(x["ratio"])]
        cells += [spread(x["minus_startup"]), spread(x["ratio_minus_startup"])]
        cells += [spread(x["minus_tiny"]), spread(x["ratio_minus_tiny"])]
        cells += [spread(x["weights_stage"]), spread(x["ratio_stage"])]
        cells += [spread(x["rss_mb"], ".0f"), spread(x["rss_over_tiny_mb"], ".0f")]
        print("| " + " | ".join(cells) + " |")


def print_commands(variants: list[Variant]) -> None:
    print("| command | wall (s) | peak RSS (MB) | as run |")
    print("|---|---|---|---|")
    for v in variants:
        wall = spread([r["wall"] for r in v.rows])
        rss = spread([r["peak_rss_mb"] for r in v.rows], ".0f")
        print(f"| {v.name} | {wall} | {rss} | `{shlex.join(v.cmd)}` |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(VITS), default="vit_l")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--out", type=Path, help="write every raw row as a JSON line to this file")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmsurgery-bench")
    ap.add_argument("--clean", action="store_true", help="remove the inputs at the end (default: kept for reuse)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    work, tiny = args.dir / f"certificate-{args.size}", args.dir / "certificate-tiny"
    work.mkdir(parents=True, exist_ok=True)
    cli = Path(sys.executable).with_name("mmsurgery")
    check_cli(cli, work)
    out = args.out.open("w") if args.out else None

    def emit(row: dict[str, Any]) -> None:
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    builds = {}
    for size, folder in dict.fromkeys([(args.size, work), ("tiny", tiny)]):
        info = build_in_child(size, folder)
        builds[size] = info
        how = "cached" if info["cached"] else ", ".join(f"{k} {s:.1f} s" for k, s in info["seconds"].items())
        lam = info["lambda_abs"]
        print(
            f"{size}: {how}; {info['folded_layers']} layers folded, |λ| {lam['min']:.3g}–{lam['max']:.3g}",
            file=sys.stderr,
        )
        emit({"kind": "build", "size": size} | info)
    keys = list(LABELS)
    layouts = {key: layout(work / PLAINS[key], args.size) for key in keys}
    for key, x in layouts.items():
        emit({"kind": "layout", "size": args.size, "input": key} | x)
    cert_bytes = (work / CERT).stat().st_size
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,OPTIONS", "-T", str(work)], capture_output=True, text=True)

    variants = make_variants(cli, work, tiny, keys)
    tiny_args = variants[1].cmd[1:]
    extra = modules_beyond_startup(cli, tiny_args, work)
    emit({"kind": "modules_beyond_startup", "modules": extra})
    for f in [*(work / PLAINS[k] for k in keys), tiny / PLAINS["writer"]]:  # warm: the inputs in the page cache
        subprocess.run(["cat", str(f)], check=True, stdout=subprocess.DEVNULL)
    for v in variants[:2]:  # torch's and mmsurgery's files in the page cache
        measure(v, work)
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(variants)
        for pos, v in enumerate(variants[k:] + variants[:k]):
            subprocess.run(["sync"], check=True)
            row = {"kind": "run", "size": args.size, "round": rnd, "position": pos, "variant": v.name}
            row |= {"method": v.method, "input": v.input} | measure(v, work)
            v.rows.append(row)
            emit(row)
            inside = f", weights stage {row['weights_seconds']:.2f} s" if "weights_seconds" in row else ""
            print(
                f"[round {rnd}/{args.rounds}] {v.name}: exit {row['exit']}, {row['wall']:.2f} s{inside}, "
                f"{row['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    summary = summarize(variants, keys)
    hwm = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    emit({"kind": "harness", "peak_rss_mb": hwm, "filesystem": fs.stdout.strip(), "cert_bytes": cert_bytes})
    for x in summary:
        emit({"kind": "summary", "size": args.size} | x)

    spec, info = VITS[args.size], builds[args.size]
    n_tensors = layouts["writer"]["tensors"]
    print(
        f"\n{args.size} (embed {spec.embed}, depth {spec.depth}, MLP {spec.mlp}, patch {spec.patch}), float32, "
        f"{info['folded_layers']} layers folded (|λ| {info['lambda_abs']['min']:.3g}–"
        f"{info['lambda_abs']['max']:.3g}); {args.rounds} interleaved rounds, order rotated, `sync` before each "
        f"command, inputs in the page cache; {work}: {fs.stdout.strip() or '?'}\n"
    )
    print_layouts(layouts)
    goal = "" if args.size != "vit_l" else f": {'under' if cert_bytes < GOAL_CERT_BYTES else 'NOT under'} 1 MB"
    print(
        f"\nCERT ({CERT}): {cert_bytes:,} bytes for {n_tensors} tensors ({cert_bytes / n_tensors:.0f} B per "
        f"tensor){goal} (the issue's goal: a ViT-L certificate under 1 MB)."
    )
    startup, tiny_wall = summary[0]["startup_median"], summary[0]["tiny_median"]
    print(
        f'\nStart-up (`python -c "{IMPORTS}"`): median {startup:.2f} s; the tiny model\'s verify: {tiny_wall:.2f} s. '
        f"The certificate gate loads {len(extra)} modules the start-up line does not"
        + (f": {module_groups(extra)}." if extra else ".")
    )
    print(
        "\nSeconds: median (min–max over rounds); ÷ sha256sum: median of the per-round ratios over the same round's "
        "`sha256sum` of the same file (min–max); − start-up / − tiny verify: minus the median over all rounds of "
        "that command; weights stage: its seconds in verify's JSON report; peak RSS: the console script's "
        f"`ru_maxrss` (at least this harness's own peak, {hwm:.0f} MB: Linux counts the spawning parent's); − tiny "
        "verify's: over the tiny verify's median peak RSS, i.e. what PLAIN's size adds "
        f"(the weights stage's two read buffers: 2 × {layouts['writer']['largest_tensor'] / 1e6:.1f} MB here).\n"
    )
    print_table(summary)
    print(f"\nGoal (issue 24): ≤ {GOAL_RATIO}× `sha256sum PLAIN` after start-up. Medians of the per-round ratios:")
    for x in summary:
        m = statistics.median
        print(
            f"- {LABELS[x['input']]}: whole process {m(x['ratio']):.2f}×, − start-up {m(x['ratio_minus_startup']):.2f}×,"
            f" − tiny verify {m(x['ratio_minus_tiny']):.2f}×, weights stage alone {m(x['ratio_stage']):.2f}×; "
            f"{(x['identical_bytes'] or 0) / 1e6:,.1f} MB hashed, sha256sum at "
            f"{layouts[x['input']]['bytes'] / 1e9 / m(x['sha256sum']):.2f} GB/s"
        )
        if "openssl" in x:
            print(
                f"  - over `openssl dgst -sha256` ({layouts[x['input']]['bytes'] / 1e9 / m(x['openssl']):.2f} GB/s):"
                f" whole process {m(x['ratio_openssl']):.2f}×, − tiny verify {m(x['ratio_minus_tiny_openssl']):.2f}×,"
                f" weights stage alone {m(x['ratio_stage_openssl']):.2f}×"
            )
    print("\nEvery command (median (min–max) over rounds), as run:\n")
    print_commands(variants)
    if out:
        out.close()
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tiny, ignore_errors=True)
    print(f"\ncommand: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")


if __name__ == "__main__":
    main()
