"""The gate with a fold certificate (`mmsurgery.certificate`): proving PLAIN where PAIRED is not.

- **weights** (`check_digests`): PLAIN read once, one tensor at a time (the next read while this one is hashed),
  each tensor's sha256 against the certificate's, with its name, dtype and shape: exact, any changed bit fails
  naming the tensor. A PLAIN that records its source (`mmsurgery.source_sha256`) must name the certificate's
  PAIRED.
- **fold** (`run_fold`): PLAIN's PyTorch outputs against the unfolded model's outputs the certificate recorded, on
  the same seeded inputs (their sha256 is checked first: `check_inputs`); the onnx stage then compares ONNX
  Runtime with the same recorded outputs.
- **cost** (`against_recorded`): the stage's own comparison with a plain reference, and the numbers against the
  recorded ones (parameters, FLOPs per op, configuration, the graph's structure when both have one).
- With `--against` too, the certificate is cross-checked (`with_cross_check`): PAIRED's sha256 and the fold's
  tensor digests must be the certificate's. After a passing gate with `--against` and no certificate yet,
  `build` makes one from what the stages computed (never from PLAIN's bytes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from mmsurgery.certificate import Certificate, RecordedOutputs, TensorDigest, certificate_versions, tensor_sha256
from mmsurgery.checkpoint.dtypes import ITEMSIZE
from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.errors import BadInputError
from mmsurgery.paired_format import SOURCE_KEY
from mmsurgery.verify.compare import compare_batches, verdict
from mmsurgery.verify.context import RunContext
from mmsurgery.verify.cost import CostResult
from mmsurgery.verify.fold_stage import FoldStageResult
from mmsurgery.verify.report import StageResult, skipped
from mmsurgery.verify.weights import WeightsResult, check_headers, name_list, source_problem

__all__ = [
    "against_recorded",
    "build",
    "check_digests",
    "check_inputs",
    "recorded_outputs",
    "run_fold",
    "with_cross_check",
]

_LISTED = 20
HASH_WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
RULE = "sha256 per tensor (certificate)"


def _hashed(plain: Checkpoint, names: list[str], workers: int = HASH_WORKERS) -> Iterator[tuple[str, str]]:
    """(name, sha256 of PLAIN's tensor) in order, each tensor read into its worker's reused buffer and hashed
    there, `workers` tensors at a time (file reads and hashlib both release the GIL, so they use the cores the
    machine has): flat memory (one buffer of the largest tensor per worker), one pass over PLAIN."""
    largest = max((plain.infos[n].numel * ITEMSIZE[plain.infos[n].dtype] for n in names), default=0)
    local = threading.local()

    def digest(name: str) -> str:
        if not hasattr(local, "buffer"):
            local.buffer = torch.empty(max(largest, 1), dtype=torch.uint8)
        return tensor_sha256(plain.read_into(name, local.buffer))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmsurgery-certificate") as pool:
        pending: deque[tuple[str, Future[str]]] = deque()
        for name in names:
            pending.append((name, pool.submit(digest, name)))
            if len(pending) > workers:
                first, job = pending.popleft()
                yield first, job.result()
        while pending:
            first, job = pending.popleft()
            yield first, job.result()


def check_digests(plain: Checkpoint, cert: Certificate) -> WeightsResult:
    """PLAIN against the certificate's tensor list: names, dtypes, shapes and the sha256 of every tensor."""
    expected = cert.by_name
    headers = check_headers(plain.infos, expected)
    names = headers.names
    differing: list[dict[str, str]] = []
    nbytes = 0
    for name, digest in _hashed(plain, names):
        want = expected[name]
        if digest != want.sha256:
            differing.append({"name": name, "sha256": digest, "expected": want.sha256})
        else:
            nbytes += plain.infos[name].numel * ITEMSIZE[plain.infos[name].dtype]
    recorded = plain.metadata.get(SOURCE_KEY)
    numbers: dict[str, Any] = {
        "rule": RULE,
        "fold_dtype": cert.fold_dtype,
        "expected_tensors": len(expected),
        "compared_tensors": len(names),
        "identical_tensors": len(names) - len(differing),
        "identical_bytes": nbytes,
        "differing_tensors": len(differing),
        "differing": differing[:_LISTED],
        **headers.to_json(),
        "source_sha256": {"recorded": recorded, "paired": cert.paired_sha256} if recorded is not None else None,
        "compared": "PLAIN's tensors vs the sha256 the certificate recorded for the fold of PAIRED",
    }
    problems: list[str] = []
    if why := source_problem(recorded, cert.paired_sha256, "the certificate's PAIRED"):
        problems.append(why)
    if differing:
        more = f" ({len(differing)} tensors differ)" if len(differing) > 1 else ""
        problems.append(
            f"not the certified fold{more}: {differing[0]['name']}: sha256 {differing[0]['sha256'][:16]}… vs "
            f"{differing[0]['expected'][:16]}… certified"
        )
    problems += headers.problems("the certified fold", f" (certified fold --dtype {cert.fold_dtype})")
    counts = {"rule": RULE, "identical_tensors": len(names) - len(differing), "differing_tensors": len(differing)}
    if problems:
        return WeightsResult(status="fail", message="; ".join(problems), numbers=numbers, **counts)
    provenance = "; PLAIN's source sha256 is the certificate's PAIRED" if recorded is not None else ""
    return WeightsResult(
        status="pass",
        message=f"{len(names)} tensors ({nbytes / 1e6:,.1f} MB) identical to the certified fold of PAIRED "
        f"{cert.paired_sha256[:16]}… (sha256 per tensor){provenance}",
        numbers=numbers,
        **counts,
    )


def cross_check(cert: Certificate, paired_sha256: str, digests: Sequence[TensorDigest]) -> list[str]:
    """How the certificate disagrees with PAIRED and the fold computed from it (empty: it is PAIRED's)."""
    problems = []
    if cert.paired_sha256 != paired_sha256:
        problems.append(
            f"the certificate names another PAIRED (sha256 {cert.paired_sha256[:16]}…, PAIRED's is "
            f"{paired_sha256[:16]}…)"
        )
    ours = {d.name: d for d in digests}
    other = [n for n in ours if n in cert.by_name and cert.by_name[n] != ours[n]]
    absent = [n for n in ours if n not in cert.by_name]
    extra = [n for n in cert.by_name if n not in ours]
    if other:
        problems.append(f"the certificate records {len(other)} tensor(s) unlike the fold of PAIRED: {name_list(other)}")
    if absent or extra:
        problems.append(f"the certificate lists other tensors than the fold ({len(absent)} absent, {len(extra)} extra)")
    return problems


def with_cross_check(
    result: WeightsResult, cert: Certificate, paired_sha256: str, digests: Sequence[TensorDigest]
) -> WeightsResult:
    """The weights stage's result with the certificate cross-checked against PAIRED (fails when they disagree)."""
    problems = cross_check(cert, paired_sha256, digests)
    numbers = {**result.numbers, "certificate": {"cross_checked": True, "problems": problems}}
    if not problems:
        return dataclasses.replace(result, numbers=numbers, message=result.message + "; the certificate is PAIRED's")
    message = "; ".join(([result.message] if result.status == "fail" else []) + problems)
    return dataclasses.replace(result, status="fail", numbers=numbers, message=message)


# ---- outputs ------------------------------------------------------------------------------------------------
def recorded_outputs(ctx: RunContext, effect: float | None) -> RecordedOutputs:
    """The unfolded model's outputs of this run (the fold stage's), on its seeded inputs, for a certificate."""
    assert ctx.unfolded_outputs is not None
    return RecordedOutputs(
        seed=ctx.options.seed,
        batch_sizes=ctx.options.batch_sizes,
        inputs={b: [tensor_sha256(t) for t in x] for b, x in ctx.inputs.items()},
        outputs={
            b: [(tuple(t.shape), t.detach().float().contiguous().numpy().tobytes()) for t in outs]
            for b, outs in ctx.unfolded_outputs.items()
        },
        pathway_effect_max_abs=effect,
    )


def check_inputs(ctx: RunContext, rec: RecordedOutputs) -> None:
    """The certificate's outputs are comparable only on the same inputs: the same seed and batch sizes, and seeded
    inputs with the same bytes (another torch could draw other numbers). `BadInputError` when they are not."""
    o = ctx.options
    if o.given_inputs is not None:
        raise BadInputError("--inputs: a certificate recorded outputs on its own seeded inputs; leave --inputs out")
    if o.seed != rec.seed or tuple(o.batch_sizes) != tuple(rec.batch_sizes):
        sizes = ",".join(str(b) for b in rec.batch_sizes)
        raise BadInputError(
            f"the certificate recorded outputs at --batch-sizes {sizes} with seed {rec.seed}; gate with those"
        )
    for b, x in ctx.inputs.items():
        if [tensor_sha256(t) for t in x] != rec.inputs.get(b):
            raise BadInputError(
                f"the seeded inputs at batch size {b} differ from those the certificate recorded (another torch "
                "draws other numbers?): write the certificate again with this torch, or gate with --against"
            )


def run_fold(ctx: RunContext) -> StageResult:
    """The fold stage without PAIRED: PLAIN's outputs against the unfolded outputs the certificate recorded."""
    cert = ctx.certificate
    assert cert is not None
    if cert.outputs is None:
        return skipped(
            "fold",
            "the certificate holds no outputs (`fold --certificate` writes weights only; "
            "`verify --against --certificate` records them)",
        )
    recorded = ctx.unfolded_outputs
    assert recorded is not None  # set by the gate from the certificate, after `check_inputs`
    tol = ctx.tol["fold"]
    ok, numbers, line = verdict(compare_batches(ctx.plain_outputs(), recorded, tol), tol)
    effect = cert.outputs.pathway_effect_max_abs
    numbers |= {
        "pathway_effect_max_abs": effect,
        "compared": "PLAIN (folded) vs the unfolded outputs the certificate recorded, PyTorch float32 eval",
    }
    shown = f"; the pathway moved the recorded output by up to {effect:.3g}" if effect is not None else ""
    return FoldStageResult(
        status="pass" if ok else "fail",
        message=f"folded vs the certificate's unfolded outputs: {line}{shown}",
        numbers=numbers,
        max_abs=numbers["max_abs"],
        max_rel=numbers["max_rel"],
        pathway_effect_max_abs=effect if effect is not None else math.nan,
    )


# ---- cost ---------------------------------------------------------------------------------------------------
COST_FIELDS = ("params", "flops", "flops_per_op", "config", "graph")


def recorded_cost(result: StageResult) -> dict[str, Any]:
    """What a certificate keeps of a passing cost stage."""
    return {k: result.numbers.get(k) for k in COST_FIELDS}


def against_recorded(result: CostResult, recorded: Mapping[str, Any]) -> CostResult:
    """The cost stage's result, failed when PLAIN's numbers differ from those the certificate recorded. The graph
    is compared when both this run and the certificate have one."""
    from mmsurgery.verify.cost import graph_differences
    from mmsurgery.verify.onnx_backend import GraphSummary

    have = recorded_cost(result)
    diffs = [
        f"{k} {have[k]!r} vs {recorded.get(k)!r} certified"
        for k in ("params", "flops")
        if recorded.get(k) is not None and have[k] != recorded.get(k)
    ]
    for k in ("flops_per_op", "config"):
        if recorded.get(k) is not None and have[k] is not None and dict(have[k]) != dict(recorded[k]):
            keys = sorted(set(have[k]) | set(recorded[k]))
            first = next(x for x in keys if have[k].get(x) != recorded[k].get(x))
            diffs.append(f"{k}: {first} {have[k].get(first)!r} vs {recorded[k].get(first)!r} certified")
    graph_checked = False
    if recorded.get("graph") is not None and have["graph"] is not None:
        graph_checked = True
        ours, theirs = GraphSummary.from_json(have["graph"]), GraphSummary.from_json(recorded["graph"])
        diffs += [f"graph: {d} certified" for d in graph_differences(ours, theirs)]
    numbers = {**result.numbers, "certified": {"differences": diffs, "graph_compared": graph_checked}}
    if diffs:
        message = "differs from the certified cost: " + "; ".join(diffs)
        if result.status == "fail":
            message = result.message + "; " + message
        return dataclasses.replace(result, status="fail", message=message, numbers=numbers)
    graph = " and graph" if graph_checked else ""
    return dataclasses.replace(result, numbers=numbers, message=result.message + f"; params, FLOPs{graph} as certified")


# ---- writing ------------------------------------------------------------------------------------------------
def build(ctx: RunContext, results: Sequence[StageResult], versions: Mapping[str, str]) -> Certificate:
    """The certificate of a passing gate with `--against`: the fold's digests (from the weights stage), PAIRED's
    sha256, the architecture and configuration, the unfolded outputs (fold stage) and the cost numbers."""
    assert ctx.paired is not None and ctx.fold_digests is not None
    by_name = {r.name: r for r in results}
    fold = by_name.get("fold")
    outputs = None
    if fold is not None and fold.status == "pass" and ctx.unfolded_outputs is not None:
        outputs = recorded_outputs(ctx, fold.numbers.get("pathway_effect_max_abs"))
    cost = by_name.get("cost")
    arch = None
    if not ctx.plain_problem:
        arch = {"name": ctx.arch.name, "config": dict(ctx.arch.describe(ctx.skeleton()))}
    return Certificate(
        paired_path=str(ctx.options.against),
        paired_sha256=ctx.paired_digest(),
        fold_dtype=ctx.fold_dtype,
        tensors=tuple(ctx.fold_digests),
        versions=certificate_versions(versions),
        written_by="verify",
        arch=arch,
        outputs=outputs,
        cost=recorded_cost(cost) if cost is not None and cost.status == "pass" else None,
    )
