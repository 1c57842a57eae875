"""The latency stage: PLAIN's graph against the reference graph in ONNX Runtime, interleaved in one process.

Absolute times on a shared CI machine are noise; a ratio of runs taken turn about (the order alternating each
round) is not. The stage reports the median per-round ratio and fails only when a limit is given and exceeded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from mmsurgery.verify.report import StageResult

__all__ = ["latency_result", "measure", "measure_alone"]


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


def latency_result(numbers: dict[str, Any], max_ratio: float | None) -> StageResult:
    numbers = {**numbers, "max_ratio": max_ratio}
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
        return StageResult("latency", "fail", 0.0, f"{line} > --max-latency-ratio {max_ratio:g}", numbers)
    limit = f" <= {max_ratio:g}" if max_ratio is not None else " (no limit set: informational)"
    return StageResult("latency", "pass", 0.0, line + limit, numbers)
