"""`verify`: the deployment gate over a plain (folded) checkpoint: option checks and the order of the stages.

weights (with `against`) → keys → fold (with `against`) → onnx (with `onnx`) → cost → latency (needs a graph).
Each stage is a module with a `run(ctx)` over one shared `context.RunContext` that returns its typed result; the
gate releases what no later stage needs after each one (`context.NEEDS`). Bad input or usage raises
`BadInputError` before any expensive work (a gate too big for the machine included: `memory.check_fits`); a stage
that runs and finds a problem (including an exporter or ONNX Runtime error) is a failed stage in the report,
never an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmsurgery import __version__
from mmsurgery.certificate import Certificate, check_certificate_output, read_certificate, write_certificate
from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.errors import BadInputError, MMSurgeryError
from mmsurgery.paired_format import (
    VIT_KEY,
    PairedCheckpoint,
    check_format,
    metadata_json,
    open_paired,
)
from mmsurgery.verify import (
    certified,
    cost,
    fold_stage,
    keys,
    latency,
    memory,
    onnx_backend,
    onnx_stage,
    preflight,
    weights,
)
from mmsurgery.verify.arch import Arch
from mmsurgery.verify.archs import load_arch
from mmsurgery.verify.context import NEEDS, STAGES, Options, PlainDoesNotLoad, RunContext
from mmsurgery.verify.inputs import check_onnx_option, parse_batch_sizes, read_inputs
from mmsurgery.verify.report import Report, StageResult, error_line, skipped

__all__ = ["DEFAULT_BATCH_SIZES", "DEFAULT_OPSET", "parse_stages", "verify"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 4)
DEFAULT_OPSET = 20

_MODEL_STAGES = ("fold", "onnx", "cost", "latency")  # skipped when PLAIN does not load into the architecture


def parse_stages(value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """`"weights,keys"` → ("weights", "keys") in the gate's order; None: every stage its inputs allow."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise BadInputError(f"--stages {value!r}: choose from {', '.join(STAGES)} (comma-separated)")
    return tuple(s for s in STAGES if s in names)


def _chosen(stages: tuple[str, ...] | None, against: bool, onnx: bool) -> tuple[str, ...]:
    """The stages to run: those asked for (each must have its inputs), else every stage its inputs allow.
    `against`: PAIRED or a certificate of it is given."""
    needs = {"weights": against, "fold": against, "onnx": onnx, "latency": onnx}
    paired = "--against PAIRED or --certificate CERT"
    option = {"weights": paired, "fold": paired, "onnx": "--onnx", "latency": "--onnx"}
    if stages is None:
        return tuple(s for s in STAGES if needs.get(s, True))
    lacking = [s for s in stages if not needs.get(s, True)]
    if lacking:
        s = lacking[0]
        raise BadInputError(f"--stages {','.join(stages)}: the {s} stage needs {option[s]}")
    return stages


def _why_not(name: str, chosen_explicitly: bool) -> str:
    if chosen_explicitly:
        return "not chosen (--stages)"
    return {
        "weights": "no --against PAIRED or --certificate given",
        "fold": "no --against PAIRED or --certificate given",
        "onnx": "no --onnx given",
        "latency": "needs an ONNX graph (--onnx)",
    }.get(name, "not chosen")


def _timed(name: str, ctx: RunContext, fn: Callable[[RunContext], StageResult]) -> StageResult:
    """Run a stage; an unexpected error (exporter, ORT, a user model) is a failed stage, bad input propagates."""
    start = time.perf_counter()
    try:
        result = fn(ctx)
    except PlainDoesNotLoad as exc:
        result = skipped(name, f"PLAIN does not load into the architecture (see keys): {exc}")
    except MMSurgeryError:
        raise
    except Exception as exc:
        log.debug("stage %s raised", name, exc_info=True)
        result = StageResult(name=name, status="fail", message=error_line(exc), numbers={"error": type(exc).__name__})
    return dataclasses.replace(result, seconds=time.perf_counter() - start)


def verify(
    plain: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    onnx: str | os.PathLike[str] | bool | None = None,
    arch: str | Arch = "vit",
    inputs: str | os.PathLike[str] | None = None,
    batch_sizes: Sequence[int] | str = DEFAULT_BATCH_SIZES,
    atol: float | None = None,
    rtol: float | None = None,
    max_latency_ratio: float | None = None,
    heads: int | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    latency_warmup: int = 3,
    latency_runs: int = 15,
    weights_ulps: int = 0,
    stages: Sequence[str] | str | None = None,
    export_cache: str | os.PathLike[str] | None = None,
    memory_limit: int | str | None = None,
    certificate: str | os.PathLike[str] | None = None,
) -> Report:
    """Verify the plain checkpoint `plain` (see docs/verify.md) and return the `Report`; never prints.

    `against`: the trained paired checkpoint it was folded from (enables the weights stage, which proves PLAIN
    bit-identical to its fold, or within `weights_ulps` units in the last place, and the fold stage; the onnx
    stage then compares ONNX Runtime with this unfolded model, the source of truth). `onnx`: True exports PLAIN to
    a temp dir; a path to an existing `.onnx` is taken as is, a new path is exported there and kept. `arch`: "vit",
    "hf" (the Hugging Face model of the `config.json` next to PLAIN, else next to PAIRED) or
    "package.module:factory". `stages`: run only these (each needs its inputs); the others are reported as
    skipped. `export_cache`: a folder where exports are kept by what shapes the graph and bound to the next PLAIN
    of the same architecture instead of exporting again (`verify.export_cache`). `memory_limit`: bytes (or "8G")
    the gate may use, instead of what the machine reports as available; a gate whose estimate exceeds it is
    refused up front. Raises `BadInputError` on bad input or options, before any expensive work.

    `certificate` (docs/verify.md, "Gating without PAIRED"): an existing certificate file is read and gates PLAIN
    in PAIRED's place (weights by per-tensor sha256; fold and onnx against its recorded outputs; cost against its
    recorded numbers), or, with `against` too, is cross-checked against PAIRED. A path that does not exist yet,
    with `against`, is where the certificate of this gate is written if every stage passes (never over a file).

    A configuration the architecture has to guess (the built-in ViT's head count, without `heads` or a recorded
    `mmsurgery.vit`) is reported in `Report.config_inferred`; a new `onnx` path (a graph to keep) of one is refused
    unless `heads` confirms it.
    """
    started = time.perf_counter()
    sizes = parse_batch_sizes(batch_sizes)
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BadInputError(f"{name} {value}: must be a finite number >= 0")
    if max_latency_ratio is not None and not (math.isfinite(max_latency_ratio) and max_latency_ratio > 0):
        raise BadInputError(f"--max-latency-ratio {max_latency_ratio}: must be a finite number > 0")
    if not 7 <= opset <= 30:
        raise BadInputError(f"--opset {opset}: choose an ONNX opset between 7 and 30 (default 20)")
    if isinstance(weights_ulps, bool) or not isinstance(weights_ulps, int) or weights_ulps < 0:
        raise BadInputError(f"--weights-ulps {weights_ulps}: must be a whole number >= 0 (0: bit-identical)")
    if latency_runs < 1 or latency_warmup < 0:
        raise BadInputError("latency_runs must be >= 1 and latency_warmup >= 0")
    asked = parse_stages(stages)
    limit = memory.parse_bytes(memory_limit) if memory_limit is not None else None
    cache_dir = Path(export_cache) if export_cache is not None else None
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise BadInputError(f"--export-cache {cache_dir}: not a folder")
    architecture = arch if isinstance(arch, Arch) else load_arch(arch, heads, checkpoints=(plain, against))
    onnx_opt = check_onnx_option(onnx)
    cert, cert_out = _certificate_option(certificate, plain, against)
    chosen = _chosen(asked, against is not None or cert is not None, onnx_opt is not None)
    if cert_out is not None and "weights" not in chosen:
        raise BadInputError(f"--certificate {cert_out}: writing a certificate needs the weights stage")
    given_inputs = read_inputs(inputs, sizes) if inputs is not None else None
    options = Options(
        plain=Path(plain),
        against=Path(against) if against is not None else None,
        onnx=onnx_opt,
        arch=architecture,
        batch_sizes=sizes,
        atol=atol,
        rtol=rtol,
        max_latency_ratio=max_latency_ratio,
        heads=heads,
        opset=opset,
        seed=seed,
        latency_warmup=latency_warmup,
        latency_runs=latency_runs,
        weights_ulps=weights_ulps,
        inputs_file=Path(inputs) if inputs is not None else None,
        given_inputs=given_inputs,
        export_cache=cache_dir,
        stages=chosen,
    )

    with contextlib.ExitStack() as stack:
        plain_ck = stack.enter_context(open_checkpoint(plain))
        check_format(plain_ck.metadata, plain_ck.path)  # the rule every reader applies: folded/2 is newer
        paired: PairedCheckpoint | None = None
        if against is not None:
            paired = stack.enter_context(open_paired(against))
            preflight.check_order(plain_ck, paired, Path(plain), Path(against))
        for ck in (plain_ck, *([paired.ck] if paired is not None else [])):
            metadata_json(ck.metadata, VIT_KEY, ck.path)  # the stages parse it: a damaged one is refused here, named
        inferred = preflight.check_arch(architecture, plain_ck, paired, chosen, onnx_opt, Path(plain))
        need = memory.estimate(
            plain_ck.infos,
            paired.ck.infos if paired is not None else None,
            chosen,
            onnx_given=isinstance(onnx_opt, Path) and onnx_opt.exists(),
            one_graph=architecture.name in ("vit", "hf"),
        )
        have = limit if limit is not None else memory.available_bytes()
        if have is not None:
            memory.check_fits(need, have)
        preloading = onnx_backend.preload() if "onnx" in chosen else None
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmsurgery-verify-")))
        ctx = RunContext(
            options=options, plain=plain_ck, paired=paired, tmp=tmp, certificate=cert, certificate_out=cert_out
        )
        if paired is None and cert is not None and cert.outputs is not None and set(chosen) & {"fold", "onnx"}:
            certified.check_inputs(ctx, cert.outputs)  # the recorded outputs are of these inputs, or bad input
            ctx.unfolded_outputs = cert.outputs.tensors()  # the reference of the fold and onnx stages
        results = _run_stages(ctx, chosen, asked is not None, preloading)
        input_names = _input_names(ctx) if set(chosen) & {"keys", *_MODEL_STAGES} else None
        inputs_seen = ctx._inputs or {}
        certificate_report = _certificate_outcome(ctx, results, chosen, cert, cert_out, certificate)
        ctx.release(frozenset())

    versions = {"mmsurgery": __version__, "torch": torch.__version__, "python": platform.python_version()}
    if "onnx" in chosen:
        versions |= onnx_backend.versions()
    report_inputs: dict[str, Any] = {
        "plain": str(plain),
        "against": str(against) if against is not None else None,
        "onnx": str(onnx_opt) if isinstance(onnx_opt, Path) else ("temporary" if onnx_opt else None),
        "arch": architecture.name,
        "batch_sizes": list(sizes),
        "seed": seed,
        "inputs_file": str(inputs) if inputs is not None else None,
        "input_shapes": {str(b): list(x[0].shape) for b, x in inputs_seen.items()},
        "input_names": input_names,
        "all_input_shapes": {str(b): [list(t.shape) for t in x] for b, x in inputs_seen.items()},
        "opset": opset,
        "dtype": ctx.dtype,
        "heads": heads,
        "max_latency_ratio": max_latency_ratio,
        "weights_ulps": weights_ulps,
        "stages": list(chosen),
        "export_cache": str(cache_dir) if cache_dir is not None else None,
        "memory_estimate_bytes": need.peak,
        "certificate": certificate_report,
    }
    tolerances = {
        "dtype": ctx.dtype,
        "source": "default" if atol is None and rtol is None else "override",
        **{stage: tol.to_json() for stage, tol in ctx.tol.items()},
    }
    return Report(
        stages=tuple(results),
        inputs=report_inputs,
        tolerances=tolerances,
        versions=versions,
        seconds=time.perf_counter() - started,
        config_inferred=inferred,
    )


def _certificate_option(
    certificate: str | os.PathLike[str] | None, plain: str | os.PathLike[str], against: str | os.PathLike[str] | None
) -> tuple[Certificate | None, Path | None]:
    """(the certificate to gate with or cross-check, the path to write one to): an existing file is read (bad
    input if it is not an intact certificate); a new path needs `--against`, and is checked as an output now."""
    if certificate is None:
        return None, None
    path = Path(certificate)
    if os.path.lexists(path):
        return read_certificate(path), None
    if against is None:
        raise BadInputError(f"--certificate {path}: no such certificate (gate with --against PAIRED to write one)")
    check_certificate_output(path, [Path(plain), Path(against)])
    return None, path


def _certificate_outcome(
    ctx: RunContext,
    results: Sequence[StageResult],
    chosen: tuple[str, ...],
    cert: Certificate | None,
    cert_out: Path | None,
    given: str | os.PathLike[str] | None,
) -> dict[str, Any] | None:
    """What the run did with the certificate, for the report; writes it after a passing gate (`cert_out`)."""
    if given is None:
        return None
    if cert is not None:
        mode = "cross-checked with PAIRED" if ctx.paired is not None else "used in PAIRED's place"
        return {"path": str(given), "mode": mode, "paired_sha256": cert.paired_sha256, "written": False}
    assert cert_out is not None
    if any(r.status == "fail" for r in results):
        return {"path": str(cert_out), "mode": "not written: the gate failed", "written": False}
    extra = onnx_backend.versions() if "onnx" in chosen else {}
    made = certified.build(ctx, results, extra)
    write_certificate(made, cert_out, inputs=[ctx.plain_ck.path, *ctx.plain_ck.files, Path(str(ctx.options.against))])
    return {"path": str(cert_out), "mode": "written", "paired_sha256": made.paired_sha256, "written": True}


def _weights(ctx: RunContext) -> StageResult:
    """PLAIN against the fold of PAIRED (the certificate, when given too, cross-checked), or against the
    certificate's digests without PAIRED."""
    if ctx.paired is None:
        assert ctx.certificate is not None
        return certified.check_digests(ctx.plain_ck, ctx.certificate)
    result = weights.run(ctx)
    if ctx.certificate is not None:
        result = certified.with_cross_check(result, ctx.certificate, ctx.paired_digest(), ctx.fold_digests or [])
    return result


def _fold(ctx: RunContext) -> StageResult:
    return fold_stage.run(ctx) if ctx.paired is not None else certified.run_fold(ctx)


def _cost(ctx: RunContext) -> StageResult:
    result = cost.run(ctx)
    recorded = ctx.certificate.cost if ctx.certificate is not None else None
    return certified.against_recorded(result, recorded) if recorded else result


_RUN: dict[str, Callable[[RunContext], StageResult]] = {
    "weights": _weights,
    "keys": keys.run,
    "fold": _fold,
    "onnx": onnx_stage.run,
    "cost": _cost,
    "latency": latency.run,
}


def _run_stages(ctx: RunContext, chosen: tuple[str, ...], explicit: bool, preloading: Any) -> list[StageResult]:
    """Every stage in order: the chosen ones run (or are skipped for a reason found on the way), the others are
    reported as skipped; after each, whatever no later stage needs is released."""
    results: list[StageResult] = []
    checked = False
    for i, name in enumerate(STAGES):
        if name not in chosen:
            results.append(skipped(name, _why_not(name, explicit)))
            continue
        if name in _MODEL_STAGES and not checked:
            ctx.check_plain_loads()  # on weightless tensors: a keys failure costs no model
            checked = True
        if name in _MODEL_STAGES and ctx.plain_problem:
            results.append(skipped(name, f"PLAIN does not load into the architecture (see keys): {ctx.plain_problem}"))
        elif name == "latency" and (ctx.session is None or ctx.reference_graph is None):
            results.append(skipped(name, "needs PLAIN's graph in ONNX Runtime and the reference graph"))
        else:
            if name == "onnx" and preloading is not None:
                preloading.join()
            results.append(_timed(name, ctx, _RUN[name]))
        later = [s for s in STAGES[i + 1 :] if s in chosen]
        ctx.release(frozenset().union(*(NEEDS[s] for s in later)))
    return results


def _input_names(ctx: RunContext) -> list[str] | None:
    """The graph's input names the architecture gives (None: the exporter names them), from the weightless model."""
    try:
        return ctx.arch.graph_names(ctx.arch.runnable(ctx.skeleton()))[0]
    except Exception:  # an architecture that cannot even build its skeleton was reported by the stages
        return None
