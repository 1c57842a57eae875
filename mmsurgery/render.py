"""Rich renderings of mmsurgery's typed results. Only the CLI imports this module."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mmsurgery.paired_format import PAIRABLE_ROLES, module_of, scale_means

# Types only: importing mmsurgery.verify or mmsurgery.fold loads torch, and `inspect` on a safetensors file must
# not (tests/test_cli_inspect.py runs the console script and checks).
if TYPE_CHECKING:
    from mmsurgery.checkpoint.writer import WriteResult
    from mmsurgery.describe import Description
    from mmsurgery.fold import FoldResult
    from mmsurgery.pairing.paired import VitRecord
    from mmsurgery.pairing.plan import Plan
    from mmsurgery.verify.report import Report

__all__ = [
    "PROGRESS_MIN_BYTES",
    "byte_progress",
    "description",
    "escape_controls",
    "fold_result",
    "human_bytes",
    "human_count",
    "keys",
    "plan",
    "plans",
    "print_error",
    "scale_chart",
    "verify_report",
    "vit_line",
    "wrote",
]


PROGRESS_MIN_BYTES = 64 * 2**20  # smaller jobs finish before a bar would be worth drawing


@contextmanager
def byte_progress(label: str, *, quiet: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """A transient progress bar on stderr for a streaming command, fed through the callback this yields
    (`on_progress(bytes_done, bytes_total)`). None — no bar at all — under `quiet`, when stderr is not a terminal
    (a pipe, a CI log), and the bar is only drawn for jobs of at least `PROGRESS_MIN_BYTES`."""
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task: list[int] = []

    def on_progress(done: int, total: int) -> None:
        if not task:
            if total < PROGRESS_MIN_BYTES:
                return
            bar.start()
            task.append(bar.add_task(label, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield on_progress
    finally:
        if task:
            bar.stop()


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def human_count(n: int) -> str:
    for unit, div in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def description(d: Description) -> Group:
    head = Text.assemble(
        (escape_controls(str(d.path)), "bold"),
        f"\n{d.format} · {human_bytes(d.file_size)} in {len(d.files)} file(s) · {d.num_tensors} tensors · ",
        (f"{d.num_params:,}", "bold"),
        " parameters",
    )
    dtypes = ", ".join(f"{name} {t} tensors ({human_count(n)})" for name, (t, n) in d.dtypes.items())
    parts: list[object] = [head, Text(f"dtypes: {dtypes}")]
    if d.unwrap_path or d.ignored or d.alternatives:
        taken = "/".join(d.unwrap_path) or "(top level)"
        line = f"state dict taken from: {taken}"
        if d.alternatives:
            line += f"; also present, not taken: {', '.join(d.alternatives)} (use --key)"
        if d.ignored:
            line += f"; ignored non-tensor entries: {', '.join(sorted(d.ignored))}"
        parts.append(Text(line, style="dim"))
    table = Table(title="transformer block stacks", title_justify="left", show_edge=False)
    for col in ("prefix", "family", "depth", "width", "MLP", "q/k/v", "norm", "bias", "params", ""):
        table.add_column(col, justify="right" if col in ("depth", "width", "MLP", "params") else "left")
    for s in d.stacks:
        flags = [
            "default" if d.default_stack is s else "",
            "decoder" if s.decoder else "",
            "EMA" if s.ema else "",
            "gated MLP" if s.gated_mlp else "",
            "Conv1D" if s.orientation == "conv1d" else "",
        ]
        table.add_row(
            escape_controls(s.prefix),
            s.family,
            str(s.depth),
            str(s.width or "?"),
            str(s.mlp_width or "-"),
            s.qkv,
            s.norm,
            s.bias,
            human_count(s.num_params),
            " ".join(f for f in flags if f),
        )
    parts.append(table)
    shown = d.default_stack or d.stacks[0]
    roles = Table(
        title=f"linears of {escape_controls(shown.blocks[0].prefix)}* (every block alike)",
        title_justify="left",
        show_edge=False,
    )
    for col in ("role", "key", "shape", "bias"):
        roles.add_column(col)
    for lin in shown.blocks[0].linears:
        roles.add_row(lin.role, escape_controls(lin.key), str(list(lin.shape)), "yes" if lin.bias else "no")
    parts.append(roles)
    for s in d.stacks:
        for note in s.notes:
            parts.append(Text(escape_controls(f"note ({s.prefix}): {note}"), style="yellow"))
    if d.scales:
        parts.append(scale_chart(d))
    if d.layout.other:
        other = ", ".join(f"{g} ({t} tensors, {human_count(p)})" for g, (t, p) in sorted(d.layout.other.items()))
        parts.append(Text(escape_controls(f"outside the blocks: {other}")))
    return Group(*parts)


def keys(names: tuple[str, ...] | list[str]) -> str:
    """`a.q.weight, a.k.weight, a.v.weight` -> `a.{q,k,v}.weight`."""
    if len(names) < 2:
        return names[0] if names else "-"
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middles = [".".join(p[head : len(p) - tail]) for p in parts]
    return ".".join([*parts[0][:head], "{" + ",".join(middles) + "}", *parts[0][len(parts[0]) - tail :]])


def wrote(output: object, written: WriteResult | None = None) -> str:
    """`wrote OUT`; for a model folder also what it holds: `wrote vit.paired/ (model.safetensors, config.json, ...)`."""
    if written is None or not written.extra_files:
        return escape_controls(f"wrote {output}")
    weights = [written.index.name] if written.index else [f.name for f in written.files]
    weights[1:] = [f"{len(written.files)} shards"] if written.index else []
    names = ", ".join([*weights, *(f.name for f in written.extra_files)])
    return escape_controls(f"wrote {output}/ ({names})")


def plans(
    ps: Sequence[Plan], output: object = None, written: WriteResult | None = None, *, vit: VitRecord | None = None
) -> Group:
    """One plan table per auxiliary model (one, as always, with one auxiliary), then the recorded ViT config."""
    if len(ps) == 1:
        return plan(ps[0], output, written, vit=vit)
    parts: list[object] = []
    for k, p in enumerate(ps):
        parts.append(Text(f"auxiliary {k + 1} of {len(ps)}", style="bold underline"))
        parts.append(plan(p, None, None, last=False))
    n = len(ps[0].pairs)
    parts.append(Text(f"{n} linears with {len(ps)} pathways each: W + Σₖ λₖ·W_auxₖ", style="bold"))
    if vit is not None:
        parts.append(vit_line(vit))
    parts.append(Text(wrote(output, written) if output else "dry run: nothing written", style="dim"))
    return Group(*parts)


def vit_line(vit: VitRecord) -> Text:
    """Where the recorded ViT config's head count came from; a warning when it was guessed."""
    heads, width = vit.config.get("num_heads"), vit.config.get("embed_dim")
    if not vit.inferred:
        return Text(escape_controls(f"ViT config: {heads} attention heads (from {vit.heads_from})"), style="dim")
    return Text(
        escape_controls(
            f"warning: ViT config inferred, not read: {heads} attention heads for width {width}, from "
            f"{vit.heads_from}; nothing confirmed it (--heads, the target's mmsurgery.vit metadata or a config.json "
            "beside it would). Recorded as inferred: verify says so and will not keep an exported graph of it; "
            "pair again with --heads N to confirm the trained model's head count"
        ),
        style="yellow",
    )


def plan(
    p: Plan,
    output: object = None,
    written: WriteResult | None = None,
    *,
    last: bool = True,
    vit: VitRecord | None = None,
) -> Group:
    table = Table(show_edge=False)
    for col in ("target layer", "aux layer", "transform", "shape", "status"):
        table.add_column(col)
    roles = PAIRABLE_ROLES
    rows = sorted(
        [
            (
                x.target_block,
                roles.index(x.role),
                x.target_key,
                keys(x.aux_keys),
                x.transform.describe(),
                x.target_shape,
                "paired",
            )
            for x in p.pairs
        ]
        + [
            (
                s.target_block,
                roles.index(s.role) if s.role in roles else 9,
                s.target_key,
                keys(s.aux_keys),
                "-",
                s.target_shape,
                f"skipped: {s.reason}",
            )
            for s in p.skips
        ]
    )
    for _, _, key, aux, transform, shape, status in rows:
        style = "" if status == "paired" else "yellow"
        table.add_row(escape_controls(key), escape_controls(aux), transform, str(list(shape)), status, style=style)
    parts: list[object] = [
        Text(
            escape_controls(
                f"target {p.target.path} ({p.target.family}, {p.target.stack}) <- aux {p.aux.path} ({p.aux.family}, {p.aux.stack})"
            )
        ),
        table,
    ]
    for w in p.warnings:
        parts.append(Text(escape_controls(f"warning: {w}"), style="yellow"))
    mode = f"; λ {p.scale_mode}" if p.scale_mode != "per-linear" else ""
    parts.append(Text(p.summary + mode, style="bold"))
    if vit is not None:
        parts.append(vit_line(vit))
    if last:
        parts.append(Text(wrote(output, written) if output else "dry run: nothing written", style="dim"))
    return Group(*parts)


def scale_chart(d: Description, width: int = 12) -> Table:
    """λ per pathway layer as a bar chart, one row per block and one column per linear role (a group of columns
    per auxiliary model when there are several): which layers use the pathway, and how much (bars scaled to the
    largest |λ|; green positive, red negative; a finer λ, per qkv chunk or channel, is shown by its mean, marked ~)."""
    scales = d.scales or {}
    means = {layer: scale_means(v) for layer, v in scales.items()}
    finer = {layer: _finer(v) for layer, v in scales.items()}
    num_aux = max((len(m) for m in means.values()), default=1)
    peak = max((abs(x) for m in means.values() for x in m), default=0.0) or 1.0
    width = max(4, width // num_aux)
    where = {module_of(lin.key): (b.prefix, lin.role) for s in d.stacks for b in s.blocks for lin in b.linears}
    order = [b.prefix for s in d.stacks for b in s.blocks]
    cells: dict[str, dict[tuple[str, int], tuple[float, bool]]] = {}
    for layer, values in means.items():
        block, role = where.get(layer, (layer, "λ"))
        for k, v in enumerate(values):
            cells.setdefault(block, {})[(role, k)] = (v, finer[layer][k])
    roles = [r for r in (*PAIRABLE_ROLES, "λ") if any((r, 0) in c for c in cells.values())]
    columns = [(r, k) for k in range(num_aux) for r in roles]
    what = f"{len(scales)} pathways" + (f" × {num_aux} auxiliaries" if num_aux > 1 else "")
    table = Table(
        title=f"λ per layer: {what}, bars scaled to max |λ| = {peak:.3g}", title_justify="left", show_edge=False
    )
    table.add_column("block")
    for role, k in columns:
        table.add_column(role if num_aux == 1 else f"{role} (aux {k + 1})")
    for block, row in sorted(cells.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        rendered = []
        for column in columns:
            if column not in row:
                rendered.append(Text("-", style="dim"))
                continue
            v, is_mean = row[column]
            bar = "█" * round(abs(v) / peak * width)
            rendered.append(
                Text(f"{'~' if is_mean else ''}{v:+.3f} ", style="bold")
                + Text(bar.ljust(width, "·"), style="green" if v >= 0 else "red")
            )
        table.add_row(escape_controls(block.rstrip(".")), *rendered)
    return table


def _finer(entry: object) -> list[bool]:
    """Per auxiliary: is λ finer than one value (so the chart shows its mean)?"""
    items = [entry] if isinstance(entry, (int, float)) else list(entry)  # type: ignore[call-overload]
    return [not isinstance(v, (int, float)) for v in items]


def fold_result(r: FoldResult) -> Text:
    if r.already_plain:
        return Text(
            escape_controls(f"{r.source} holds no pathway tensors: already plain, nothing written"), style="bold"
        )
    size = human_bytes(r.written.total_size) if r.written else "0 B"
    lam = ", ".join("/".join(f"{x:+.3g}" for x in scale_means(v)) for v in list(r.scales.values())[:4])
    more = ", ..." if len(r.scales) > 4 else ""
    return Text.assemble(
        (f"folded {len(r.scales)} pathways", "bold"),
        f" (λ {lam}{more}) into {r.num_tensors} plain tensors, {size}\n",
        wrote(r.output, r.written)
        + (f"\nsource sha256 {r.sha256}" if r.sha256 else "")
        + ("\n" + escape_controls(f"certificate {r.certificate}") if r.certificate else ""),
    )


# C0/C1 controls (ESC, CR, LF, ...), lone surrogates (from undecodable file names or pickled keys), line and
# paragraph separators, and bidi overrides: what could move the cursor, colour the terminal, split the line or
# make the encoder raise.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def escape_controls(text: str) -> str:
    """`text` with every control character and lone surrogate written as its Python escape (`\\x1b`, `\\n`,
    `\\ud800`), so a message that quotes a hostile name stays one printable line and never reaches the terminal
    raw; everything else, non-ASCII letters included, is kept as is."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def print_error(console: Console, message: str) -> None:
    """The CLI's one error line. Escaped here, at the boundary: messages quote names from the input (tensor names,
    file names, keys), and a name may hold terminal escapes, newlines or surrogates no encoder accepts."""
    console.print(Text("error: ", style="bold red") + Text(escape_controls(message)), soft_wrap=True)


_VERIFY_STATUS = {"pass": ("PASS", "bold green"), "fail": ("FAIL", "bold red"), "skip": ("skip", "dim")}


def _verify_number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return human_count(value) if value >= 10**4 else str(value)
    return f"{value:.4g}"


def verify_report(report: Report) -> Group:
    """The stage table (stage, status, seconds, key numbers, message) and one verdict line."""
    table = Table(show_edge=False)
    for col in ("stage", "status", "s", "numbers", "message"):
        table.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for s in report.stages:
        label, style = _VERIFY_STATUS[s.status]
        shown = [f"{label} {_verify_number(value)}" for label, value in s.headline() if value is not None]
        table.add_row(
            s.name,
            Text(label, style=style),
            f"{s.seconds:.1f}",
            ", ".join(shown) or "-",
            Text(escape_controls(s.message), style="red" if s.status == "fail" else ""),
        )
    counts = {st: sum(s.status == st for s in report.stages) for st in ("pass", "fail", "skip")}
    tally = f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {report.seconds:.1f} s"
    if report.passed:
        verdict = Text.assemble(("PASSED", "bold green"), f": {tally}")
    else:
        verdict = Text.assemble(("FAILED", "bold red"), f" ({', '.join(report.failed)}): {tally}")
    head = Text(escape_controls(f"mmsurgery verify {report.inputs.get('plain')}"), style="bold")
    cert = report.inputs.get("certificate")
    if cert:
        digest = f" (PAIRED sha256 {cert['paired_sha256'][:16]}…)" if cert.get("paired_sha256") else ""
        verdict.append("\n" + escape_controls(f"certificate {cert['path']}: {cert['mode']}{digest}"))
    if not report.config_inferred:
        return Group(head, table, verdict)
    guessed = ", ".join(f"{k} {v}" for k, v in report.config_inferred.items())
    verdict.append(f"; config inferred ({guessed}), not confirmed", style="yellow")
    note = Text(
        escape_controls(
            f"config inferred, not recorded: {guessed} (the head-dim-64 rule; neither --heads nor the checkpoint's "
            "mmsurgery.vit metadata confirms it): this gate checks the model built from that guess, which may not be "
            "the trained one; pass --heads N to confirm"
        ),
        style="bold yellow",
    )
    return Group(head, note, table, verdict)
