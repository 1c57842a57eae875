"""The latency stage: PLAIN's graph against the reference graph in ONNX Runtime, interleaved in one process.

Absolute times on a shared CI machine are noise; a ratio of runs taken turn about (the order alternating each
round) is not. The stage reports the median per-round ratio and fails only when a limit is given and exceeded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmsurgery.verify.report import StageResult

if TYPE_CHECKING:
    from mmsurgery.verify.context import RunContext

__all__ = ["LatencyResult", "latency_result", "measure", "measure_alone", "run"]


@dataclass(frozen=True, kw_only=True)
class LatencyResult(StageResult):
    name: str = "latency"
    ratio: float
    median_ms: float
    reference_median_ms: float

    def headline(self) -> list[tuple[str, object]]:
        return [("ratio", self.ratio), ("ms", self.median_ms), ("ref ms", self.reference_median_ms)]


def run(ctx: RunContext) -> LatencyResult:
    """PLAIN's ORT session (the onnx stage's) against the reference graph's, at the first batch size."""
    from mmsurgery.verify.onnx_backend import OrtRunner

    plain, graph, o = ctx.session, ctx.reference_graph, ctx.options
    assert plain is not None and graph is not None
    b = o.batch_sizes[0]
    x = ctx.inputs[b]
    if ctx.graph is not None and graph == ctx.graph.path:  # the ratio is 1 by construction: a few rounds suffice
        numbers = measure_alone(lambda: plain(x), warmup=min(o.latency_warmup, 1), runs=min(o.latency_runs, 5))
    else:
        reference = OrtRunner(graph)
        numbers = measure(lambda: plain(x), lambda: reference(x), warmup=o.latency_warmup, runs=o.latency_runs)
    numbers["batch_size"] = b
    return latency_result(numbers, o.max_latency_ratio)


def measure(
    plain: Callable[[], Any], reference: Callable[[], Any], *, warmup: int = 3, runs: int = 15
) -> dict[str, Any]:
    """Time `plain()` and `reference()` turn about: `warmup` untimed calls each, then `runs` timed rounds."""
    for _ in range(warmup):
        plain()
        reference()
    t_plain: list[float] = []
    t_ref: list[float] = []
    for i in range(runs):
        pair = ((plain, t_plain), (reference, t_ref))
        for fn, times in pair if i % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [p / r for p, r in zip(t_plain, t_ref, strict=True) if r > 0]
    return {
        "warmup": warmup,
        "runs": runs,
        "median_ms": statistics.median(t_plain) * 1e3,
        "reference_median_ms": statistics.median(t_ref) * 1e3,
        "ratio": statistics.median(ratios) if ratios else float("nan"),
        "ratio_min": min(ratios) if ratios else float("nan"),
        "ratio_max": max(ratios) if ratios else float("nan"),
    }


def measure_alone(plain: Callable[[], Any], *, warmup: int = 3, runs: int = 15) -> dict[str, Any]:
    """Time `plain()` alone, for a reference that is the same graph: its ratio is 1 by construction."""
    for _ in range(warmup):
        plain()
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        plain()
        times.append(time.perf_counter() - start)
    median_ms = statistics.median(times) * 1e3
    return {
        "warmup": warmup,
        "runs": runs,
        "median_ms": median_ms,
        "reference_median_ms": median_ms,
        "ratio": 1.0,
        "ratio_min": 1.0,
        "ratio_max": 1.0,
        "same_graph": True,
    }


def latency_result(numbers: dict[str, Any], max_ratio: float | None) -> LatencyResult:
    numbers = {**numbers, "max_ratio": max_ratio}
    headline = {k: numbers[k] for k in ("ratio", "median_ms", "reference_median_ms")}
    ratio = numbers["ratio"]
    if not numbers.get("same_graph"):
        line = (
            f"median {numbers['median_ms']:.3g} ms vs reference {numbers['reference_median_ms']:.3g} ms at batch "
            f"{numbers.get('batch_size', '?')}: ratio {ratio:.3f} (median of {numbers['runs']} interleaved rounds)"
        )
    else:
        line = (
            f"median {numbers['median_ms']:.3g} ms at batch {numbers.get('batch_size', '?')} ({numbers['runs']} "
            "rounds); the reference graph is PLAIN's own export (same code and configuration), so the ratio is 1 "
            "by construction"
        )
    if max_ratio is not None and not ratio <= max_ratio:
        message = f"{line} > --max-latency-ratio {max_ratio:g}"
        return LatencyResult(status="fail", message=message, numbers=numbers, **headline)
    limit = f" <= {max_ratio:g}" if max_ratio is not None else " (no limit set: informational)"
    return LatencyResult(status="pass", message=line + limit, numbers=numbers, **headline)
