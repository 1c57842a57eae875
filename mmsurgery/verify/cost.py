"""The cost stage: the folded model costs exactly what a plain model of the same configuration costs.

Parameters and FLOPs come from PyTorch (`FlopCounterMode`, batch 1, attention through the math SDPA backend so
its matmuls are counted on CPU); the graph comparison (opset, node count, op-type histogram, initializer shapes
and dtypes, Gelu's `approximate`, graph inputs and outputs) catches what FLOP counters miss: a leftover
elementwise `Mul`/`Add`, or a tanh GELU where the reference has the exact one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmsurgery.verify import onnx_backend
from mmsurgery.verify.inputs import first_rows
from mmsurgery.verify.onnx_backend import GraphSummary
from mmsurgery.verify.report import StageResult

if TYPE_CHECKING:
    from mmsurgery.verify.context import RunContext

__all__ = ["CostResult", "cost_result", "count_flops", "count_params", "graph_differences", "run"]


@dataclass(frozen=True, kw_only=True)
class CostResult(StageResult):
    name: str = "cost"
    params: int
    flops: int
    node_count: int | None = None

    def headline(self) -> list[tuple[str, object]]:
        shown = [("params", self.params), ("FLOPs", self.flops)]
        return shown + ([("nodes", self.node_count)] if self.node_count is not None else [])


def run(ctx: RunContext) -> CostResult:
    """PLAIN against a plain reference of the same configuration: parameters, FLOPs, configuration, and the ONNX
    graph's structure when the onnx stage made or took one. The reference holds PLAIN's own tensors (assigned,
    not copied): exporters drop or fold constant initialisers (all-ones LayerNorm weights, zero biases of a fresh
    model), so fresh weights would make two equal structures look different."""
    arch, plain = ctx.arch, ctx.plain_model()
    reference = arch.reference(ctx.skeleton_state(), ctx.plain_ck.metadata).eval()
    x1 = ctx.inputs[1] if 1 in ctx.inputs else first_rows(ctx.inputs[max(ctx.options.batch_sizes)], 1)
    flops = None
    if arch.meta_flops:  # FLOPs depend on shapes alone here: counted on the weightless models, without compute
        x_meta = tuple(t.to("meta") for t in x1)
        flops = (count_flops(arch.runnable(ctx.skeleton()), x_meta), count_flops(arch.runnable(reference), x_meta))
    problem = ctx.assign(reference, plain.state_dict())
    if problem:
        return CostResult(
            status="fail", message=f"PLAIN's tensors do not fit the plain reference: {problem}", params=0, flops=0
        )
    reference = reference.float()
    if flops is None:
        flops = (count_flops(arch.runnable(plain), x1), count_flops(arch.runnable(reference), x1))
    graphs = None
    note = arch.reference_note
    graph_skip = ctx.graph_skip if ctx.options.onnx is not None else "no --onnx given"
    if ctx.graph is not None:
        summary = onnx_backend.summarize_graph(ctx.graph.path)
        if ctx.graph.exported and arch.same_graph(plain, reference):
            # Exporting the reference would trace the same code with the same config and weights again (~half
            # of a gate's time): its graph is PLAIN's. A given graph is always compared with a fresh export.
            ctx.reference_graph = ctx.graph.path
            note += "; reference graph: PLAIN's own export (same model class and configuration)"
            graphs = (summary, summary)
        else:
            path = ctx.tmp / "reference.onnx"
            ctx.reference_graph, _ = ctx.export(arch.runnable(reference), path, arch.describe(reference))
            graphs = (summary, onnx_backend.summarize_graph(ctx.reference_graph))
    return cost_result(
        params=(count_params(plain), count_params(reference)),
        flops=flops,
        graphs=graphs,
        graph_skip=graph_skip,
        reference_note=note,
        configs=(arch.describe(plain), arch.describe(reference)),
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, x: Tensor | Sequence[Tensor]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of one forward on `x`, one tensor or the forward's positional tensors (a
    multiply-add counts 2)."""
    args = (x,) if isinstance(x, Tensor) else tuple(x)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        model(*args)
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), dict(sorted(per_op.items()))


def _multiset(d: Mapping[str, int]) -> str:
    return ", ".join(k if len(d) == 1 else f"{k}×{v}" for k, v in d.items()) or "(none)"


def _mapping_diff(label: str, have: Mapping[str, int], want: Mapping[str, int]) -> str | None:
    keys = sorted(set(have) | set(want))
    diffs = [f"{k} {have.get(k, 0)} vs {want.get(k, 0)}" for k in keys if have.get(k, 0) != want.get(k, 0)]
    if not diffs:
        return None
    more = f", ... ({len(diffs)} in all)" if len(diffs) > 6 else ""
    return f"{label}: {', '.join(diffs[:6])}{more}"


def graph_differences(plain: GraphSummary, ref: GraphSummary) -> list[str]:
    """Every way PLAIN's graph differs from the reference's, as `what: plain vs reference` lines."""
    out: list[str] = []
    if plain.opset != ref.opset:
        out.append(f"opset {plain.opset} vs {ref.opset}")
    if plain.node_count != ref.node_count:
        out.append(f"node count {plain.node_count} vs {ref.node_count}")
    for line in (
        _mapping_diff("op types", plain.op_histogram, ref.op_histogram),
        _mapping_diff("initializers", plain.initializers, ref.initializers),
    ):
        if line:
            out.append(line)
    if plain.initializer_elements != ref.initializer_elements:
        out.append(f"initializer elements {plain.initializer_elements} vs {ref.initializer_elements}")
    if plain.gelu_approximate != ref.gelu_approximate:
        if set(plain.gelu_approximate) != set(ref.gelu_approximate):
            out.append(f"Gelu approximate: {_multiset(plain.gelu_approximate)} vs {_multiset(ref.gelu_approximate)}")
        else:
            out.append(f"Gelu approximate: {plain.gelu_approximate} vs {ref.gelu_approximate}")
    if plain.inputs != ref.inputs:
        out.append(f"graph inputs {plain.inputs} vs {ref.inputs}")
    if plain.outputs != ref.outputs:
        out.append(f"graph outputs {plain.outputs} vs {ref.outputs}")
    return out


def cost_result(
    *,
    params: tuple[int, int],
    flops: tuple[tuple[int, dict[str, int]], tuple[int, dict[str, int]]],
    graphs: tuple[GraphSummary, GraphSummary] | None,
    graph_skip: str | None,
    reference_note: str,
    configs: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {}),
) -> CostResult:
    """Compare PLAIN (first of each pair) with the reference (second); any difference fails and is listed.

    `configs` are the architecture's own description of both models (the built-in ViT's `ViTConfig`), compared
    key by key: that catches a tanh GELU even without a graph."""
    (p_plain, p_ref), ((f_plain, ops_plain), (f_ref, ops_ref)) = params, flops
    diffs: list[str] = [
        f"config {k}: {configs[0].get(k)} vs {configs[1].get(k)}"
        for k in sorted(set(configs[0]) | set(configs[1]))
        if configs[0].get(k) != configs[1].get(k)
    ]
    if p_plain != p_ref:
        diffs.append(f"params {p_plain:,} vs {p_ref:,}")
    if f_plain != f_ref:
        diffs.append(f"FLOPs {f_plain:,} vs {f_ref:,}")
    elif ops_plain != ops_ref:
        line = _mapping_diff("FLOPs per op", ops_plain, ops_ref)
        diffs.append(line or "FLOPs per op differ")
    numbers: dict[str, Any] = {
        "params": p_plain,
        "reference_params": p_ref,
        "flops": f_plain,
        "reference_flops": f_ref,
        "flops_per_op": ops_plain,
        "reference": reference_note,
    }
    if configs[0] or configs[1]:
        numbers["config"], numbers["reference_config"] = dict(configs[0]), dict(configs[1])
    if graphs is not None:
        plain_graph, ref_graph = graphs
        diffs += graph_differences(plain_graph, ref_graph)
        numbers["graph"] = plain_graph.to_json()
        numbers["reference_graph"] = ref_graph.to_json()
        numbers["node_count"] = plain_graph.node_count
        numbers["reference_node_count"] = ref_graph.node_count
    else:
        numbers["graph_skipped"] = graph_skip
    numbers["differences"] = diffs
    headline = {"params": p_plain, "flops": f_plain, "node_count": numbers.get("node_count")}
    if diffs:
        return CostResult(
            status="fail", message="differs from the plain reference: " + "; ".join(diffs), numbers=numbers, **headline
        )
    graph = (
        f", ONNX graph identical in structure ({graphs[0].node_count} nodes, opset {graphs[0].opset.get('', '?')})"
        if graphs is not None
        else f"; graph not compared ({graph_skip})"
    )
    message = f"same as the plain reference: {p_plain:,} params, {f_plain:,} FLOPs at batch 1{graph}"
    return CostResult(status="pass", message=message, numbers=numbers, **headline)
