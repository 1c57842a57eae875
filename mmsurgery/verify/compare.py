"""Tensor comparison: one pure function, one result type that says how far apart, where, and what would pass.

An element passes when `|actual - expected| <= atol + rtol * |expected|` (torch.allclose / numpy semantics;
the relative part is taken against the expected side); `rtol_admitted` counts the elements above atol that
passed only through the relative part, so a message can say which part of the rule let a difference through.
NaN or inf on one side only is a mismatch. A failing comparison reports the max abs and max rel error, the index
of the worst element, and the tolerance that would have passed: the max abs error as atol with rtol 0, and the
smallest rtol for the given atol.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TOLERANCES",
    "Comparison",
    "Tolerance",
    "compare_batches",
    "compare_outputs",
    "flatten_outputs",
    "summarize",
    "tolerances_for",
    "verdict",
]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def to_json(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}


# dtype of PLAIN -> stage -> tolerance (documented in docs/verify.md; change both together)
DEFAULT_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float32": {"fold": Tolerance(1e-5, 0.0), "onnx": Tolerance(1e-4, 1e-3)},
    "float64": {"fold": Tolerance(1e-5, 0.0), "onnx": Tolerance(1e-4, 1e-3)},
    "float16": {"fold": Tolerance(1e-2, 1e-2), "onnx": Tolerance(1e-2, 1e-2)},
    "bfloat16": {"fold": Tolerance(5e-2, 5e-2), "onnx": Tolerance(5e-2, 5e-2)},
}


def tolerances_for(dtype: str, atol: float | None = None, rtol: float | None = None) -> dict[str, Tolerance]:
    """The default fold/onnx tolerances for PLAIN's dtype (float32's for an unknown one), with overrides applied."""
    base = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])
    return {
        stage: Tolerance(tol.atol if atol is None else atol, tol.rtol if rtol is None else rtol)
        for stage, tol in base.items()
    }


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """`actual` against `expected` for one output at one batch size."""

    label: str  # e.g. "batch 4" or "batch 4, output 1"
    batch_size: int
    output: int
    shape: tuple[int, ...]
    atol: float
    rtol: float
    passed: bool
    shape_mismatch: str | None
    mismatched: int
    total: int
    max_abs: float
    max_rel: float
    where: tuple[int, ...]  # index of the max abs error
    flat_index: int
    actual_at: float
    expected_at: float
    passing_atol: float  # with rtol 0
    passing_rtol: float | None  # with the given atol; None: no rtol passes (an error where expected is 0)
    rtol_admitted: int = 0  # elements above atol that passed only through rtol·|expected|

    @classmethod
    def from_tensors(
        cls, actual: Tensor, expected: Tensor, *, atol: float, rtol: float, batch_size: int, output: int = 0
    ) -> Comparison:
        label = f"batch {batch_size}" + (f", output {output}" if output else "")
        if tuple(actual.shape) != tuple(expected.shape):
            why = f"shape {list(actual.shape)} vs expected {list(expected.shape)}"
            return cls.mismatch(why, atol=atol, rtol=rtol, batch_size=batch_size, output=output)
        a = actual.detach().to(torch.float64).reshape(-1)
        e = expected.detach().to(torch.float64).reshape(-1)
        shape = tuple(expected.shape)
        common = {
            "label": label,
            "batch_size": batch_size,
            "output": output,
            "shape": shape,
            "atol": atol,
            "rtol": rtol,
        }
        if e.numel() == 0:  # two empty tensors: equal
            return cls(
                **common,
                passed=True,
                shape_mismatch=None,
                mismatched=0,
                total=0,
                max_abs=0.0,
                max_rel=0.0,
                where=(),
                flat_index=-1,
                actual_at=0.0,
                expected_at=0.0,
                passing_atol=0.0,
                passing_rtol=0.0,
            )
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))  # equal infinities and NaN pairs are no error
        diff = torch.where(same, torch.zeros_like(a), (a - e).abs().nan_to_num(nan=math.inf))
        mag = e.abs().nan_to_num(nan=math.inf, posinf=math.inf)
        ok = diff <= atol + rtol * mag
        flat = int(torch.argmax(diff))
        max_abs = float(diff[flat])
        nonzero = mag > 0
        rel = torch.where(nonzero, diff / torch.where(nonzero, mag, torch.ones_like(mag)), torch.zeros_like(diff))
        max_rel = float(rel.max())
        over = diff > atol
        if not bool(over.any()):
            passing_rtol: float | None = 0.0
        elif bool((over & ~nonzero).any()):
            passing_rtol = None
        else:
            passing_rtol = float(((diff - atol) / torch.where(nonzero, mag, torch.ones_like(mag)))[over].max())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)) if shape else ()
        return cls(
            **common,
            passed=bool(ok.all()),
            shape_mismatch=None,
            mismatched=int((~ok).sum()),
            total=int(e.numel()),
            max_abs=max_abs,
            max_rel=max_rel,
            where=where,
            flat_index=flat,
            actual_at=float(a[flat]),
            expected_at=float(e[flat]),
            passing_atol=max_abs,
            passing_rtol=passing_rtol,
            rtol_admitted=int((ok & (diff > atol)).sum()),
        )

    @classmethod
    def mismatch(cls, why: str, *, atol: float, rtol: float, batch_size: int, output: int = 0) -> Comparison:
        """A comparison that could not look at values (different shapes or output counts): always failing."""
        label = f"batch {batch_size}" + (f", output {output}" if output else "")
        nan = float("nan")
        return cls(
            label=label,
            batch_size=batch_size,
            output=output,
            shape=(),
            atol=atol,
            rtol=rtol,
            passed=False,
            shape_mismatch=why,
            mismatched=0,
            total=0,
            max_abs=nan,
            max_rel=nan,
            where=(),
            flat_index=-1,
            actual_at=nan,
            expected_at=nan,
            passing_atol=nan,
            passing_rtol=None,
        )

    def describe(self) -> str:
        """One line: the errors, where, how many elements fail, and the tolerance that would pass."""
        if self.shape_mismatch:
            return f"{self.label}: {self.shape_mismatch}"
        head = (
            f"max abs {self.max_abs:.3g} at {list(self.where)} of {self.label} (flat {self.flat_index}: "
            f"{self.actual_at:.6g} vs {self.expected_at:.6g} expected), max rel {self.max_rel:.3g}"
        )
        if self.passed:
            return head
        rtol = "no rtol" if self.passing_rtol is None else f"rtol {self.passing_rtol:.3g}"
        return (
            f"{head}; {self.mismatched}/{self.total} elements exceed atol {self.atol:g} + rtol {self.rtol:g}·|expected|;"
            f" would pass with atol {self.passing_atol:.3g} (rtol 0) or {rtol} (atol {self.atol:g})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "output": self.output,
            "shape": list(self.shape),
            "passed": self.passed,
            "shape_mismatch": self.shape_mismatch,
            "mismatched": self.mismatched,
            "total": self.total,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "where": list(self.where),
            "flat_index": self.flat_index,
            "actual_at": self.actual_at,
            "expected_at": self.expected_at,
            "passing_atol": self.passing_atol,
            "passing_rtol": self.passing_rtol,
            "rtol_admitted": self.rtol_admitted,
        }


def flatten_outputs(out: Any) -> list[Tensor]:
    """A model output (a tensor, or tuples/lists/dicts of them, e.g. a HF ModelOutput) as a flat tensor list."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def compare_outputs(
    actual: Sequence[Tensor], expected: Sequence[Tensor], *, atol: float, rtol: float, batch_size: int
) -> list[Comparison]:
    """Compare output lists position by position; a different number of outputs is one failing comparison."""
    if len(actual) != len(expected):
        why = f"{len(actual)} outputs vs {len(expected)} expected"
        return [Comparison.mismatch(why, atol=atol, rtol=rtol, batch_size=batch_size)]
    return [
        Comparison.from_tensors(a, e, atol=atol, rtol=rtol, batch_size=batch_size, output=i)
        for i, (a, e) in enumerate(zip(actual, expected, strict=True))
    ]


def summarize(comparisons: Sequence[Comparison]) -> tuple[bool, dict[str, Any], Comparison | None]:
    """(all passed, the headline numbers, the worst comparison: a failing one first, then the largest max abs)."""
    if not comparisons:
        return True, {}, None
    worst = max(comparisons, key=lambda c: (not c.passed, c.shape_mismatch is not None, _num(c.max_abs)))
    numbers: dict[str, Any] = {
        "max_abs": max(_num(c.max_abs) for c in comparisons),
        "max_rel": max(_num(c.max_rel) for c in comparisons),
        "worst": worst.to_json(),
        "per_batch": [c.to_json() for c in comparisons],
    }
    return all(c.passed for c in comparisons), numbers, worst


def _num(x: float) -> float:
    return math.inf if math.isnan(x) else x


def compare_batches(
    actual: Mapping[int, Sequence[Tensor]], expected: Mapping[int, Sequence[Tensor]], tol: Tolerance
) -> list[Comparison]:
    """Every output at every batch size of `expected` against `actual`."""
    return [
        c for b in expected for c in compare_outputs(actual[b], expected[b], atol=tol.atol, rtol=tol.rtol, batch_size=b)
    ]


def verdict(comparisons: Sequence[Comparison], tol: Tolerance) -> tuple[bool, dict[str, Any], str]:
    """(passed, the numbers of `summarize` with the tolerance, one line): on a pass the line states the whole
    rule and which part of it admitted the elements; on a failure it describes the worst comparison."""
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
