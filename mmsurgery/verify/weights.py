"""The weights stage: PLAIN is, tensor by tensor and bit for bit, what `mmsurgery fold` makes of PAIRED.

PAIRED fully determines the correct plain checkpoint, so no output comparison is needed to prove a fold: stream
PAIRED through the fold's own per-tensor computation (`fold.PlainTensors`, which calls `foldmath.fold_weight`
for every pathway weight and passes every other tensor through), cast as `fold --dtype` would for PLAIN's
dtype, and compare with PLAIN. Keys, shapes and dtypes must match exactly; values must be bit-identical, or
within `max_ulps` units in the last place when a fold made by another tool is gated (`--weights-ulps`).

Needs no model and no architecture: it works for any family. Memory stays near one tensor of each file (plus a
bounded chunk of integer work on a tensor that differs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from mmsurgery.certificate import TensorDigest, tensor_sha256
from mmsurgery.checkpoint.dtypes import FLOATING, ITEMSIZE
from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.loaded import Checkpoint, TensorInfo
from mmsurgery.fold import DTYPES, PlainTensors, plain_tensors
from mmsurgery.paired_format import SOURCE_KEY, PairedCheckpoint, paired_view
from mmsurgery.verify.report import StageResult

if TYPE_CHECKING:
    from mmsurgery.verify.context import RunContext

__all__ = [
    "HeaderCheck",
    "TensorDiff",
    "WeightsResult",
    "check_headers",
    "check_weights",
    "compare_bits",
    "name_list",
    "run",
    "source_problem",
]

_LISTED = 20
_CHUNK = 1 << 22  # elements per step of the integer work on a differing tensor (32 MB of int64 per temporary)
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGITS = {8: 17, 4: 9, 2: 5, 1: 4}  # significant digits that round-trip a float of that many bytes
_FAR = torch.iinfo(torch.int64).max  # the distance of a NaN against a number, or of any integer difference


@dataclass(frozen=True)
class TensorDiff:
    """Where PLAIN's tensor `name` differs from the expected one: how many elements have other bits, how many
    are further than the allowed ulps, and the worst element (flat and shaped index, both values, distance)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    total: int
    differing: int  # elements whose bits differ
    over: int  # elements further apart than the allowed ulps
    worst_index: tuple[int, ...]
    worst_flat: int
    actual: float
    expected: float
    ulps: int | None  # at the worst element; None: not comparable in ulps (NaN vs a number, or an integer dtype)

    def describe(self) -> str:
        distance = "not comparable in ulps" if self.ulps is None else f"{self.ulps:,} ulp{'s' * (self.ulps != 1)}"
        digits = _DIGITS.get(ITEMSIZE.get(self.dtype, 8), 17)  # enough to tell neighbouring values apart
        return (
            f"{self.name}: {self.over:,} of {self.total:,} element(s) differ; worst at {list(self.worst_index)}: "
            f"{self.actual:.{digits}g} vs {self.expected:.{digits}g} expected ({distance})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "total": self.total,
            "differing": self.differing,
            "over": self.over,
            "worst_index": list(self.worst_index),
            "worst_flat": self.worst_flat,
            "actual": self.actual,
            "expected": self.expected,
            "ulps": self.ulps,
        }


def _ordered(bits: Tensor) -> Tensor:
    """IEEE bit patterns (as signed integers) mapped to int64 so that adjacent floats are adjacent integers:
    non-negative floats keep their pattern, negative ones become -(magnitude). ±0 both map to 0."""
    b = bits.to(torch.int64)
    sign_bit = -(1 << (bits.element_size() * 8 - 1))
    return torch.where(b < 0, sign_bit - b, b)


def _distance(oa: Tensor, oe: Tensor) -> Tensor:
    """|oa - oe| without int64 overflow: exact where both have one sign; across signs |oa| + |oe|, saturated."""
    same = (oa >= 0) == (oe >= 0)
    across = oa.abs().to(torch.float64) + oe.abs().to(torch.float64)
    across = torch.clamp(across, max=2.0**62).to(torch.int64)  # saturated below _FAR, which means "no distance"
    return torch.where(same, (oa - oe).abs(), across)


def compare_bits(name: str, actual: Tensor, expected: Tensor, max_ulps: int = 0) -> TensorDiff | None:
    """None when `actual` has exactly the bits of `expected`, or (floating dtypes, `max_ulps` > 0) every element
    is within `max_ulps` units in the last place; else where and by how much they differ. Same shape and dtype
    are the caller's to check. +0 and -0 count as one ulp apart; a NaN against anything but the same NaN bits,
    and any difference in an integer or bool tensor, is never within tolerance."""
    shape, total = tuple(expected.shape), expected.numel()
    if total == 0:
        return None
    int_dtype = _INT_VIEW[expected.element_size()]
    a_bits = actual.detach().contiguous().reshape(-1).view(int_dtype)
    e_bits = expected.detach().contiguous().reshape(-1).view(int_dtype)
    if torch.equal(a_bits, e_bits):
        return None
    floating = expected.is_floating_point()
    differing = over = 0
    worst_flat, worst = -1, -1
    for start in range(0, total, _CHUNK):
        ab, eb = a_bits[start : start + _CHUNK], e_bits[start : start + _CHUNK]
        diff = ab != eb
        n_diff = int(diff.sum())
        if not n_diff:
            continue
        differing += n_diff
        if floating:
            dist = _distance(_ordered(ab), _ordered(eb))
            a = actual.reshape(-1)[start : start + _CHUNK]
            e = expected.reshape(-1)[start : start + _CHUNK]
            dist = torch.where(diff & (a.isnan() | e.isnan()), _FAR, dist)
            dist = torch.where(diff, dist.clamp(min=1), 0)  # other bits are at least one ulp apart (+0 vs -0)
        else:
            dist = torch.where(diff, _FAR, 0)
        over += int((dist > max_ulps).sum())
        i = int(torch.argmax(dist))
        if int(dist[i]) > worst:
            worst, worst_flat = int(dist[i]), start + i
    if not over:
        return None
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst_flat), shape)) if shape else ()
    a_val, e_val = actual.reshape(-1)[worst_flat].item(), expected.reshape(-1)[worst_flat].item()
    ulps = None if worst == _FAR else worst
    dtype = str(expected.dtype).removeprefix("torch.")
    return TensorDiff(name, shape, dtype, total, differing, over, index, worst_flat, a_val, e_val, ulps)


def _fold_dtype(plain: Checkpoint, paired: PairedCheckpoint) -> str:
    """The `fold --dtype` that explains most of PLAIN's floating dtypes: `keep`, or the one float dtype of PLAIN.
    Tensors it does not explain are reported as dtype mismatches. From headers alone: the fold keeps every plain
    key of PAIRED, in PAIRED's dtype unless cast."""
    keep = 0
    seen: Counter[str] = Counter()
    for name in paired.plain_keys:
        info, want = plain.infos.get(name), paired.ck.infos[name]
        if info is None or want.dtype not in FLOATING:
            continue
        keep += info.dtype == want.dtype
        seen[info.dtype] += 1
    if not seen:
        return "keep"
    dtype, count = seen.most_common(1)[0]
    return dtype if dtype in DTYPES and count > keep else "keep"


def _prefetch(
    source: PlainTensors, plain: Checkpoint, names: list[str], ahead: int = 1, digests: bool = False
) -> Iterator[tuple[str, Tensor, Tensor, str | None]]:
    """(name, actual, expected) in order, read and folded `ahead` tensors ahead on as many worker threads: file
    reads and torch kernels release the GIL, so reading the next pair overlaps comparing this one. At most
    `ahead` + 1 pairs are in memory at once. One ahead is enough: the fold's kernels already use both cores
    (measured on ViT-L: 2 ahead took 3.19 s and 380 MB, 1 ahead 3.06 s and 260 MB; benchmarks/weights.py).
    With `digests`, the sha256 of each expected tensor (the fold's, for a certificate) is computed there too."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    def load(name: str) -> tuple[str, Tensor, Tensor, str | None]:
        expected = source.tensor(name)
        return name, plain.get(name), expected, tensor_sha256(expected) if digests else None

    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="mmsurgery-weights") as pool:
        pending: deque[Future[tuple[str, Tensor, Tensor, str | None]]] = deque()
        todo = iter(names)
        for name in todo:
            pending.append(pool.submit(load, name))
            if len(pending) >= ahead:
                break
        while pending:
            item = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield item


class _Described(Protocol):
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def dtype(self) -> str: ...


@dataclass(frozen=True, kw_only=True)
class HeaderCheck:
    """PLAIN's names, shapes and dtypes against the tensors it should hold, before any data is read."""

    missing: list[str]  # expected, not in PLAIN
    unexpected: list[str]  # in PLAIN, not expected
    shapes: list[dict[str, Any]]  # {key, shape, expected}
    dtypes: list[dict[str, Any]]  # {key, dtype, expected}: same shape, other dtype
    names: list[str]  # expected tensors PLAIN holds with the right shape and dtype: the ones to compare, in order

    def problems(self, reference: str, dtype_note: str = "") -> list[str]:
        """One line per kind of mismatch, naming `reference` ("the fold", "the certified fold")."""
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} tensor(s) of {reference} missing: {name_list(self.missing)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} tensor(s) {reference} does not make: {name_list(self.unexpected)}")
        if self.shapes:
            s = self.shapes[0]
            out.append(
                f"{len(self.shapes)} shape mismatch(es), e.g. {s['key']} {s['shape']} vs {s['expected']} expected"
            )
        if self.dtypes:
            d = self.dtypes[0]
            out.append(
                f"{len(self.dtypes)} dtype mismatch(es), e.g. {d['key']} {d['dtype']} vs {d['expected']} "
                f"expected{dtype_note}"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "missing": _clip(self.missing),
            "unexpected": _clip(self.unexpected),
            "shape_mismatch": _clip(self.shapes),
            "dtype_mismatch": _clip(self.dtypes),
        }


def check_headers(plain: Mapping[str, TensorInfo], expected: Mapping[str, _Described]) -> HeaderCheck:
    """Compare PLAIN's headers (`plain`: name -> info) with the expected tensors' names, shapes and dtypes."""
    shapes = [
        {"key": k, "shape": list(plain[k].shape), "expected": list(e.shape)}
        for k, e in expected.items()
        if k in plain and tuple(plain[k].shape) != tuple(e.shape)
    ]
    dtypes = [
        {"key": k, "dtype": plain[k].dtype, "expected": e.dtype}
        for k, e in expected.items()
        if k in plain and tuple(plain[k].shape) == tuple(e.shape) and plain[k].dtype != e.dtype
    ]
    bad = {d["key"] for d in shapes} | {d["key"] for d in dtypes}
    return HeaderCheck(
        missing=[k for k in expected if k not in plain],
        unexpected=[k for k in plain if k not in expected],
        shapes=shapes,
        dtypes=dtypes,
        names=[k for k in expected if k in plain and k not in bad],
    )


def _clip(items: list[Any]) -> list[Any]:
    return items[:_LISTED]


def name_list(items: Sequence[str]) -> str:
    """The first three names and how many there are in all, for a one-line message."""
    more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
    return ", ".join(items[:3]) + more


def source_problem(recorded: str | None, digest: str, whose: str) -> str | None:
    """Why PLAIN's recorded source (`fold --source-hash`: `mmsurgery.source_sha256`) is not the PAIRED it is gated
    against (`digest`, described as `whose`), or None: PLAIN records no source, or the right one."""
    if recorded is None or recorded == digest:
        return None
    return (
        f"PLAIN records that it was folded from another file: its {SOURCE_KEY} is {recorded[:16]}…, {whose} is "
        f"{digest[:16]}…"
    )


@dataclass(frozen=True, kw_only=True)
class WeightsResult(StageResult):
    """The weights stage's result: how many tensors were proven, how many differ, under which rule."""

    name: str = "weights"
    rule: str
    identical_tensors: int
    differing_tensors: int

    def headline(self) -> list[tuple[str, object]]:
        return [("identical", self.identical_tensors), ("differ", self.differing_tensors), ("rule", self.rule)]


def run(ctx: RunContext) -> WeightsResult:
    """The stage as the gate runs it: PLAIN against the fold of PAIRED. With a certificate to write or to
    cross-check, the fold's digests and dtype are left in the context (`fold_digests`, `fold_dtype`)."""
    assert ctx.paired is not None
    collect = ctx.certificate_out is not None or ctx.certificate is not None
    digests: list[TensorDigest] | None = [] if collect else None
    result = check_weights(
        ctx.plain_ck, ctx.paired, ctx.options.weights_ulps, digests=digests, paired_hash=ctx.paired_hash
    )
    ctx.fold_digests, ctx.fold_dtype = digests, str(result.numbers.get("fold_dtype", "keep"))
    return result


def check_weights(
    plain: Checkpoint,
    paired: PairedCheckpoint | Checkpoint,
    max_ulps: int = 0,
    *,
    digests: list[TensorDigest] | None = None,
    paired_hash: HashJob | None = None,
) -> WeightsResult:
    """Compare PLAIN with the fold of PAIRED, tensor by tensor (see the module docstring). Raises `FoldError`
    (bad input) when PAIRED cannot be folded at all.

    A PLAIN that records its source (`fold --source-hash`: `mmsurgery.source_sha256`) must name this PAIRED: its
    sha256 is computed on a second thread while the tensors are compared, and a different digest fails the stage
    even when every tensor matches (PLAIN claims another origin than the file it is gated against).

    `digests`, a list, receives the name, dtype, shape and sha256 of every expected tensor compared (the fold of
    PAIRED as computed here, never PLAIN's): what a certificate records. `paired_hash`: PAIRED's sha256 already
    being computed (the run context's, when a certificate needs it too), so PAIRED is never hashed twice."""
    if not isinstance(paired, PairedCheckpoint):
        paired = paired_view(paired)
    recorded = plain.metadata.get(SOURCE_KEY)
    hashing = paired_hash
    if hashing is None and recorded is not None:
        hashing = HashJob(paired.ck.files, opener=paired.ck.open_pinned)
    dtype = _fold_dtype(plain, paired)
    source = plain_tensors(paired, dtype)
    expected: dict[str, TensorInfo] = {s.name: s for s in source.specs}
    headers = check_headers(plain.infos, expected)
    names = headers.names
    diffs: list[TensorDiff] = []
    nbytes = 0
    for name, actual, want, sha in _prefetch(source, plain, names, digests=digests is not None):
        if digests is not None and sha is not None:
            spec = expected[name]
            digests.append(TensorDigest(name=name, dtype=spec.dtype, shape=tuple(spec.shape), sha256=sha))
        diff = compare_bits(name, actual, want, max_ulps)
        if diff is None:
            nbytes += want.numel() * want.element_size()
        else:
            diffs.append(diff)
    rule = "bit-identical" if max_ulps == 0 else f"within {max_ulps} ulp{'s' * (max_ulps != 1)}"
    numbers: dict[str, Any] = {
        "rule": rule,
        "max_ulps": max_ulps,
        "fold_dtype": dtype,
        "pathways": len(source.layers),
        "expected_tensors": len(expected),
        "compared_tensors": len(names),
        "identical_tensors": len(names) - len(diffs),
        "identical_bytes": nbytes,
        "differing_tensors": len(diffs),
        "differing": [d.to_json() for d in _clip(diffs)],
        **headers.to_json(),
        "compared": f"PLAIN vs `mmsurgery fold --dtype {dtype}` of PAIRED, tensor by tensor",
    }
    digest = hashing.result() if hashing is not None and recorded is not None else None
    numbers["source_sha256"] = {"recorded": recorded, "paired": digest} if digest is not None else None
    problems: list[str] = []
    if digest is not None and (why := source_problem(recorded, digest, "PAIRED's sha256")):
        problems.append(why)
    if diffs:
        worst = max(diffs, key=lambda d: (d.ulps is None, d.ulps or 0))
        more = f" ({len(diffs)} tensors differ, worst first)" if len(diffs) > 1 else ""
        problems.append(f"not {rule}{more}: {worst.describe()}")
    problems += headers.problems("the fold", f" (fold --dtype {dtype})")
    counts = {"rule": rule, "identical_tensors": len(names) - len(diffs), "differing_tensors": len(diffs)}
    if problems:
        return WeightsResult(status="fail", message="; ".join(problems), numbers=numbers, **counts)
    folded = f"{len(source.layers)} folded pathway weights" if source.layers else "no pathways: PAIRED is plain"
    provenance = "; PLAIN's source sha256 is PAIRED's" if digest is not None else ""
    return WeightsResult(
        status="pass",
        message=f"{len(names)} tensors ({nbytes / 1e6:,.1f} MB) {rule} to the fold of PAIRED (--dtype {dtype}; "
        f"{folded}){provenance}",
        numbers=numbers,
        **counts,
    )
