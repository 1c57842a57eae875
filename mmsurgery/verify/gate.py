"""`verify`: the deployment gate over a plain (folded) checkpoint. Stages run in order; each returns a result.

weights (with `against`) → keys → fold (with `against`) → onnx (with `onnx`) → cost → latency (needs a graph).
Bad input or usage raises `BadInputError` before any expensive work; a stage that runs and finds a problem (including an exporter or ONNX
Runtime error) is a failed stage in the report, never an exception.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsurgery import __version__
from mmsurgery.checkpoint.dtypes import FLOATING
from mmsurgery.checkpoint.reader import Checkpoint, open_checkpoint
from mmsurgery.errors import BadInputError, MMSurgeryError
from mmsurgery.hf import to_disk_names, to_model_names
from mmsurgery.paired_format import scale_values, split_paired
from mmsurgery.pathway import attach, scales
from mmsurgery.verify import cost, latency, onnx_stage
from mmsurgery.verify.arch import Arch, load_arch
from mmsurgery.verify.compare import Comparison, Tolerance, compare_outputs, flatten_outputs, summarize, tolerances_for
from mmsurgery.verify.inputs import check_onnx_option, first_rows, make_inputs, parse_batch_sizes, read_inputs
from mmsurgery.verify.keys import check_keys
from mmsurgery.verify.report import Report, StageResult, error_line
from mmsurgery.verify.weights import check_weights

__all__ = ["verify"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 4)
DEFAULT_OPSET = 20


def _dominant_dtype(ck: Checkpoint) -> str:
    totals: dict[str, int] = {}
    for info in ck.infos.values():
        if info.dtype in FLOATING:
            totals[info.dtype] = totals.get(info.dtype, 0) + info.numel
    return max(totals, key=lambda d: totals[d]) if totals else "float32"


def _load_strict(arch: Arch, model: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    """Load strictly (`Arch.load`: names converted to the model's); the error text when it does not fit, else None."""
    try:
        arch.load(model, state)
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _model_shapes(arch: Arch, model: nn.Module, file_keys: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a checkpoint of `model` holds, named as the file names them: a key of the file that maps
    onto a model key (`hf.to_model_names`) keeps the file's name, any other gets its on-disk name. The identity for
    a model that is not a Hugging Face one."""
    shapes = arch.state_shapes(model)
    file_name = {m: f for f, m in to_model_names(model, {k: k for k in file_keys}).items()}
    disk = to_disk_names(model, [n for n in shapes if n not in file_name])
    return {file_name.get(n) or disk[n]: s for n, s in shapes.items()}


@dataclass
class _Run:
    """State shared by the stages of one verify run."""

    arch: Arch
    batch_sizes: tuple[int, ...]
    tol: dict[str, Tolerance]
    inputs: dict[int, tuple[Tensor, ...]] = field(default_factory=dict)
    plain: nn.Module | None = None
    plain_call: nn.Module | None = None  # what runs PLAIN: `arch.runnable(plain)`
    plain_skip: str = ""
    plain_outputs: dict[int, list[Tensor]] = field(default_factory=dict)
    unfolded_outputs: dict[int, list[Tensor]] = field(default_factory=dict)
    graph: Path | None = None
    graph_exported: bool = False  # PLAIN's graph was exported from `plain` in this run (not a given file)
    graph_skip: str = "no --onnx given"
    runner: onnx_stage.OrtRunner | None = None
    reference: nn.Module | None = None
    reference_graph: Path | None = None

    def outputs_of_plain(self) -> dict[int, list[Tensor]]:
        assert self.plain_call is not None
        if not self.plain_outputs:
            self.plain_outputs = _forward(self.plain_call, self.inputs)
        return self.plain_outputs

    def export(self, runnable: nn.Module, path: Path, opset: int) -> Path:
        inputs, outputs = self.arch.graph_names(runnable)
        example = self.inputs[max(self.batch_sizes)]
        return onnx_stage.export(runnable, example, path, opset=opset, input_names=inputs, output_names=outputs)


def _forward(model: nn.Module, inputs: Mapping[int, tuple[Tensor, ...]]) -> dict[int, list[Tensor]]:
    with torch.no_grad():
        return {b: [t.float() for t in flatten_outputs(model(*x))] for b, x in inputs.items()}


def _comparisons(
    actual: Mapping[int, list[Tensor]], expected: Mapping[int, list[Tensor]], tol: Tolerance
) -> list[Comparison]:
    return [
        c for b in expected for c in compare_outputs(actual[b], expected[b], atol=tol.atol, rtol=tol.rtol, batch_size=b)
    ]


def _verdict(comparisons: list[Comparison], tol: Tolerance) -> tuple[bool, dict[str, Any], str]:
    ok, numbers, worst = summarize(comparisons)
    numbers["atol"], numbers["rtol"] = tol.atol, tol.rtol
    assert worst is not None
    admitted = sum(c.rtol_admitted for c in comparisons)
    numbers["rtol_admitted"] = admitted
    batches = ", ".join(str(b) for b in dict.fromkeys(c.batch_size for c in comparisons))
    if not ok:
        return ok, numbers, worst.describe()
    exact = " (bit-exact)" if numbers["max_abs"] == 0 else ""
    rule = f"|actual - expected| <= atol {tol.atol:g} + rtol {tol.rtol:g}·|expected|"
    if admitted:
        part = (
            f"{admitted} element(s) above atol passed only through rtol·|expected| (max rel {numbers['max_rel']:.3g})"
        )
    else:
        part = "every element within atol alone"
    return ok, numbers, f"max abs {numbers['max_abs']:.3g}{exact} at batch {batches}; {rule}: {part}"


def _stage_fold(run: _Run, paired_ck: Checkpoint) -> StageResult:
    assert run.plain is not None
    paired = paired_ck.to_state_dict()
    plain_part, _ = split_paired(paired)
    unfolded = run.arch.build(plain_part, paired_ck.metadata)
    attach(unfolded, paired)  # attach converts the pathway keys to the model's names itself
    problem = _load_strict(run.arch, unfolded, paired)
    if problem:
        raise BadInputError(f"{paired_ck.path}: does not load strictly into the model with its pathway: {problem}")
    target = run.arch.build(plain_part, paired_ck.metadata)
    problem = _load_strict(run.arch, target, plain_part)
    if problem:
        raise BadInputError(f"{paired_ck.path}: its plain part does not load strictly into the model: {problem}")
    lam = scales(unfolded)
    run.unfolded_outputs = _forward(run.arch.runnable(unfolded.float().eval()), run.inputs)
    first = run.batch_sizes[0]  # the pathway's effect needs one batch, not all
    target_outputs = _forward(run.arch.runnable(target.float().eval()), {first: run.inputs[first]})
    del unfolded, target
    tol = run.tol["fold"]
    ok, numbers, line = _verdict(_comparisons(run.outputs_of_plain(), run.unfolded_outputs, tol), tol)
    effect = max(
        (
            float((u - t).abs().max()) if u.numel() and u.shape == t.shape else math.inf
            for u, t in zip(run.unfolded_outputs[first], target_outputs[first], strict=False)
        ),
        default=0.0,
    )
    numbers |= {
        "pathways": len(lam),
        "max_abs_lambda": max((abs(x) for v in lam.values() for x in scale_values(v)), default=0.0),
        "pathway_effect_max_abs": effect,
        "compared": "PLAIN (folded) vs PAIRED with its pathway (unfolded), PyTorch float32 eval",
    }
    numbers["pathway_effect_batch_size"] = first
    effect_line = f"the pathway moves the output by up to {effect:.3g} (unfolded vs target without it, batch {first})"
    if effect == 0:
        effect_line = "the pathway changes nothing (λ = 0?): this comparison is trivial"
    status = "pass" if ok else "fail"
    return StageResult("fold", status, 0.0, f"folded vs unfolded: {line}; {effect_line}", numbers)


def _stage_onnx(run: _Run, onnx: Path | bool, tmp: Path, opset: int, against: bool) -> StageResult:
    assert run.plain_call is not None
    numbers: dict[str, Any] = {"opset_requested": opset}
    plain_outputs = run.outputs_of_plain()  # before the export: a first call settles what the forward returns
    if isinstance(onnx, Path) and onnx.exists():
        path, source = onnx, "given"
    else:
        path = onnx if isinstance(onnx, Path) else tmp / "plain.onnx"
        source = "exported" if isinstance(onnx, Path) else "exported (temporary)"
        start = time.perf_counter()
        try:
            run.export(run.plain_call, path, opset)
        except Exception as exc:
            log.debug("ONNX export failed", exc_info=True)
            run.graph_skip = "the export of PLAIN failed"
            return StageResult("onnx", "fail", 0.0, f"torch.onnx.export failed: {error_line(exc)}", numbers)
        numbers["export_seconds"] = time.perf_counter() - start
    numbers |= {"path": str(path), "source": source}
    try:
        onnx_stage.check_model(path)
    except Exception as exc:
        run.graph_skip = "PLAIN's graph fails onnx.checker"
        return StageResult("onnx", "fail", 0.0, f"onnx.checker: {error_line(exc)}", numbers)
    run.graph = path
    run.graph_exported = source != "given"
    try:
        run.runner = onnx_stage.OrtRunner(path)
        numbers["ort"] = run.runner.settings
        ort_out = {b: run.runner(x) for b, x in run.inputs.items()}
    except Exception as exc:
        return StageResult("onnx", "fail", 0.0, f"ONNX Runtime: {error_line(exc)}", numbers)
    against = against and bool(run.unfolded_outputs)  # without them the fold stage failed already
    expected = run.unfolded_outputs if against else plain_outputs
    numbers["compared"] = "ONNX Runtime vs " + ("PAIRED unfolded in PyTorch" if against else "PLAIN in PyTorch")
    tol = run.tol["onnx"]
    ok, found, line = _verdict(_comparisons(ort_out, expected, tol), tol)
    numbers |= found
    if against:
        _, vs_plain, _ = summarize(_comparisons(ort_out, plain_outputs, tol))
        numbers["vs_plain_pytorch_max_abs"] = vs_plain.get("max_abs")
        line += f" (ORT vs PLAIN in PyTorch: max abs {vs_plain.get('max_abs', 0.0):.3g})"
    what = "ORT vs unfolded PyTorch" if against else "ORT vs PyTorch"
    return StageResult("onnx", "pass" if ok else "fail", 0.0, f"{what}: {line}; graph {source}", numbers)


def _stage_cost(
    run: _Run, plain_part: Mapping[str, Tensor], metadata: Mapping[str, str], tmp: Path, opset: int, onnx_asked: bool
) -> StageResult:
    assert run.plain is not None and run.plain_call is not None
    run.reference = run.arch.reference(plain_part, metadata).float().eval()
    # The same weights in the reference: exporters drop or fold constant initialisers (all-ones LayerNorm
    # weights, zero biases of a fresh model), so fresh weights would make two equal structures look different.
    problem = _load_strict(run.arch, run.reference, plain_part)
    if problem:
        return StageResult("cost", "fail", 0.0, f"PLAIN's tensors do not fit the plain reference: {problem}", {})
    reference_call = run.arch.runnable(run.reference)
    x1 = run.inputs[1] if 1 in run.inputs else first_rows(run.inputs[max(run.batch_sizes)], 1)
    params = (cost.count_params(run.plain), cost.count_params(run.reference))
    flops = (cost.count_flops(run.plain_call, x1), cost.count_flops(reference_call, x1))
    graphs = None
    graph_skip = run.graph_skip if onnx_asked else "no --onnx given"
    note = run.arch.reference_note
    if run.graph is not None:
        summary = onnx_stage.summarize_graph(run.graph)
        if run.graph_exported and run.arch.same_graph(run.plain, run.reference):
            # Exporting the reference would trace the same code with the same config and weights again (~half
            # of a ViT-S gate's time): its graph is PLAIN's. A given graph is always compared with a fresh export.
            run.reference_graph = run.graph
            note += "; reference graph: PLAIN's own export (same model class and configuration)"
            graphs = (summary, summary)
        else:
            run.reference_graph = run.export(reference_call, tmp / "reference.onnx", opset)
            graphs = (summary, onnx_stage.summarize_graph(run.reference_graph))
    return cost.cost_result(
        params=params,
        flops=flops,
        graphs=graphs,
        graph_skip=graph_skip,
        reference_note=note,
        configs=(run.arch.describe(run.plain), run.arch.describe(run.reference)),
    )


def _stage_latency(run: _Run, warmup: int, runs: int, max_ratio: float | None) -> StageResult:
    plain, graph = run.runner, run.reference_graph
    assert plain is not None and graph is not None
    b = run.batch_sizes[0]
    x = run.inputs[b]
    if graph == run.graph:  # the ratio is 1 by construction: a few rounds give the median for the record
        numbers = latency.measure_alone(lambda: plain(x), warmup=min(warmup, 1), runs=min(runs, 5))
    else:
        reference = onnx_stage.OrtRunner(graph)
        numbers = latency.measure(lambda: plain(x), lambda: reference(x), warmup=warmup, runs=runs)
    numbers["batch_size"] = b
    return latency.latency_result(numbers, max_ratio)


def _timed(name: str, fn: Callable[[], StageResult]) -> StageResult:
    """Run a stage; an unexpected error (exporter, ORT, a user model) is a failed stage, bad input propagates."""
    start = time.perf_counter()
    try:
        result = fn()
    except MMSurgeryError:
        raise
    except Exception as exc:
        log.debug("stage %s raised", name, exc_info=True)
        result = StageResult(name, "fail", 0.0, error_line(exc), {"error": type(exc).__name__})
    return dataclasses.replace(result, seconds=time.perf_counter() - start)


def _skip(name: str, why: str) -> StageResult:
    return StageResult(name, "skip", 0.0, why)


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
) -> Report:
    """Verify the plain checkpoint `plain` (see docs/verify.md) and return the `Report`; never prints.

    `against`: the trained paired checkpoint it was folded from (enables the weights stage, which proves PLAIN
    bit-identical to its fold, or within `weights_ulps` units in the last place, and the fold stage; the onnx
    stage then compares ONNX Runtime with this unfolded model, the source of truth). `onnx`: True exports PLAIN to
    a temp dir; a path to an existing `.onnx` is taken as is, a new path is exported there and kept. `arch`: "vit",
    "hf" (the Hugging Face model of the `config.json` next to PLAIN, else next to PAIRED) or
    "package.module:factory". Raises `BadInputError` on bad input or options, before any expensive work.
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
    architecture = arch if isinstance(arch, Arch) else load_arch(arch, heads, checkpoints=(plain, against))
    onnx_opt = check_onnx_option(onnx)
    given_inputs = read_inputs(inputs, sizes) if inputs is not None else None

    preloading = onnx_stage.preload() if onnx_opt is not None else None
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmsurgery-verify-")))
        plain_ck = stack.enter_context(open_checkpoint(plain))
        paired_ck = stack.enter_context(open_checkpoint(against)) if against is not None else None
        dtype = _dominant_dtype(plain_ck)
        run = _Run(architecture, sizes, tolerances_for(dtype, atol, rtol))
        plain_state = plain_ck.to_state_dict()
        plain_part, _ = split_paired(plain_state)
        model = architecture.build(plain_part, plain_ck.metadata)
        paired_shapes = {k: i.shape for k, i in paired_ck.infos.items()} if paired_ck is not None else None
        plain_shapes = {k: i.shape for k, i in plain_ck.infos.items()}
        stages = []
        if paired_ck is not None:
            stages.append(_timed("weights", lambda: check_weights(plain_ck, paired_ck, weights_ulps)))

        def keys() -> StageResult:
            return check_keys(plain_shapes, _model_shapes(architecture, model, list(plain_shapes)), paired_shapes)

        stages.append(_timed("keys", keys))
        problem = _load_strict(architecture, model, plain_part)
        if problem:
            run.plain_skip = f"PLAIN does not load into the architecture (see keys): {problem}"
        else:
            run.plain = model.float().eval()
            run.plain_call = architecture.runnable(run.plain)
        run.inputs = make_inputs(architecture, model, sizes, seed, given_inputs)

        def gated(name: str, fn: Callable[[], StageResult]) -> StageResult:
            return _skip(name, run.plain_skip) if run.plain is None else _timed(name, fn)

        if paired_ck is None:
            stages.append(_skip("fold", "no --against PAIRED given"))
        else:
            stages.append(gated("fold", lambda: _stage_fold(run, paired_ck)))
        if preloading is not None:
            preloading.join()
        if onnx_opt is None:
            stages.append(_skip("onnx", "no --onnx given"))
        else:
            stages.append(gated("onnx", lambda: _stage_onnx(run, onnx_opt, tmp, opset, paired_ck is not None)))
        stages.append(
            gated("cost", lambda: _stage_cost(run, plain_part, plain_ck.metadata, tmp, opset, onnx_opt is not None))
        )
        if onnx_opt is None:
            stages.append(_skip("latency", "needs an ONNX graph (--onnx)"))
        elif run.runner is None or run.reference_graph is None:
            stages.append(_skip("latency", "needs PLAIN's graph in ONNX Runtime and the reference graph"))
        else:
            stages.append(
                _timed("latency", lambda: _stage_latency(run, latency_warmup, latency_runs, max_latency_ratio))
            )
        run.runner = None

    versions = {"mmsurgery": __version__, "torch": torch.__version__, "python": platform.python_version()}
    if onnx_opt is not None:
        versions |= onnx_stage.versions()
    report_inputs: dict[str, Any] = {
        "plain": str(plain),
        "against": str(against) if against is not None else None,
        "onnx": str(onnx_opt) if isinstance(onnx_opt, Path) else ("temporary" if onnx_opt else None),
        "arch": architecture.name,
        "batch_sizes": list(sizes),
        "seed": seed,
        "inputs_file": str(inputs) if inputs is not None else None,
        "input_shapes": {str(b): list(x[0].shape) for b, x in run.inputs.items()},
        "input_names": (architecture.graph_names(run.plain_call)[0] if run.plain_call is not None else None),
        "all_input_shapes": {str(b): [list(t.shape) for t in x] for b, x in run.inputs.items()},
        "opset": opset,
        "dtype": dtype,
        "heads": heads,
        "max_latency_ratio": max_latency_ratio,
        "weights_ulps": weights_ulps,
    }
    tolerances = {
        "dtype": dtype,
        "source": "default" if atol is None and rtol is None else "override",
        **{stage: tol.to_json() for stage, tol in run.tol.items()},
    }
    return Report(tuple(stages), report_inputs, tolerances, versions, time.perf_counter() - started)
