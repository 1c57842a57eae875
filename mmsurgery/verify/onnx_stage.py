"""The onnx stage: PLAIN's graph (given, exported, or bound from the export cache) checked with onnx.checker and run
in ONNX Runtime at each batch size, against the unfolded model's outputs (with `--against`) or PLAIN's own.

The onnx and onnxruntime calls are `onnx_backend`'s; its names are re-exported here for the callers of before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsurgery.verify.compare import compare_batches, summarize, verdict
from mmsurgery.verify.context import Graph, RunContext
from mmsurgery.verify.onnx_backend import (
    MAX_BATCH,
    GraphSummary,
    OrtRunner,
    check_model,
    export,
    preload,
    probe_onnx_file,
    summarize_graph,
    versions,
)
from mmsurgery.verify.report import StageResult, error_line

__all__ = [
    "MAX_BATCH",
    "GraphSummary",
    "OnnxResult",
    "OrtRunner",
    "check_model",
    "export",
    "preload",
    "probe_onnx_file",
    "run",
    "summarize_graph",
    "versions",
]

log = logging.getLogger(__name__)


# ---- the stage ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class OnnxResult(StageResult):
    name: str = "onnx"
    max_abs: float | None = None
    max_rel: float | None = None
    export_seconds: float | None = None

    def headline(self) -> list[tuple[str, object]]:
        shown = (("max abs", self.max_abs), ("max rel", self.max_rel), ("export s", self.export_seconds))
        return [(label, value) for label, value in shown if value is not None]


def _graph(ctx: RunContext, numbers: dict[str, Any]) -> Graph:
    """PLAIN's graph: the given file, or an export of PLAIN's model (through the export cache when one is given)."""
    onnx = ctx.options.onnx
    if isinstance(onnx, Path) and onnx.exists():
        return Graph(path=onnx, source="given", exported=False)
    path = onnx if isinstance(onnx, Path) else ctx.tmp / "plain.onnx"
    source = "exported" if isinstance(onnx, Path) else "exported (temporary)"
    runnable = ctx.plain_call()
    start = time.perf_counter()
    _, cache = ctx.export(runnable, path, ctx.arch.describe(ctx.plain_model()))
    seconds = time.perf_counter() - start
    numbers["export_seconds"] = seconds
    if cache is not None:
        numbers["export_cache"] = cache
    return Graph(path=path, source=source, exported=True, export_seconds=seconds, cache=cache)


def run(ctx: RunContext) -> OnnxResult:
    """PLAIN's graph in ONNX Runtime against the unfolded model's outputs (with `--against`) or PLAIN's own."""
    numbers: dict[str, Any] = {"opset_requested": ctx.options.opset}
    plain_outputs = ctx.plain_outputs()  # before the export: a first call settles what the forward returns
    try:
        graph = _graph(ctx, numbers)
    except Exception as exc:
        log.debug("ONNX export failed", exc_info=True)
        ctx.graph_skip = "the export of PLAIN failed"
        return OnnxResult(status="fail", message=f"torch.onnx.export failed: {error_line(exc)}", numbers=numbers)
    numbers |= {"path": str(graph.path), "source": graph.source}
    try:
        check_model(graph.path)
    except Exception as exc:
        ctx.graph_skip = "PLAIN's graph fails onnx.checker"
        return OnnxResult(status="fail", message=f"onnx.checker: {error_line(exc)}", numbers=numbers)
    ctx.graph = graph
    try:
        ctx.session = OrtRunner(graph.path)
        numbers["ort"] = ctx.session.settings
        ort_out = {b: ctx.session(x) for b, x in ctx.inputs.items()}
    except Exception as exc:
        return OnnxResult(status="fail", message=f"ONNX Runtime: {error_line(exc)}", numbers=numbers)
    against = ctx.unfolded_outputs is not None  # without them there was no --against, or the fold stage failed
    expected = ctx.unfolded_outputs if ctx.unfolded_outputs is not None else plain_outputs
    reference = "the certificate's unfolded outputs" if ctx.paired is None else "PAIRED unfolded in PyTorch"
    numbers["compared"] = "ONNX Runtime vs " + (reference if against else "PLAIN in PyTorch")
    tol = ctx.tol["onnx"]
    ok, found, line = verdict(compare_batches(ort_out, expected, tol), tol)
    numbers |= found
    if against:
        _, vs_plain, _ = summarize(compare_batches(ort_out, plain_outputs, tol))
        numbers["vs_plain_pytorch_max_abs"] = vs_plain.get("max_abs")
        line += f" (ORT vs PLAIN in PyTorch: max abs {vs_plain.get('max_abs', 0.0):.3g})"
    what = (
        ("ORT vs certified unfolded outputs" if ctx.paired is None else "ORT vs unfolded PyTorch")
        if against
        else "ORT vs PyTorch"
    )
    cached = " (bound from the export cache)" if graph.cache == "hit" else ""
    return OnnxResult(
        status="pass" if ok else "fail",
        message=f"{what}: {line}; graph {graph.source}{cached}",
        numbers=numbers,
        max_abs=numbers["max_abs"],
        max_rel=numbers["max_rel"],
        export_seconds=graph.export_seconds,
    )
