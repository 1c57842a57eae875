"""The cost stage: the folded model costs exactly what a plain model of the same configuration costs.

Parameters and FLOPs come from PyTorch (`FlopCounterMode`, batch 1, attention through the math SDPA backend so
its matmuls are counted on CPU); the graph comparison (opset, node count, op-type histogram, initializer shapes
and dtypes, Gelu's `approximate`, graph inputs and outputs) catches what FLOP counters miss: a leftover
elementwise `Mul`/`Add`, or a tanh GELU where the reference has the exact one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmsurgery.verify.onnx_stage import GraphSummary
from mmsurgery.verify.report import StageResult

__all__ = ["cost_result", "count_flops", "count_params", "graph_differences"]


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
) -> StageResult:
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
    if diffs:
        return StageResult("cost", "fail", 0.0, "differs from the plain reference: " + "; ".join(diffs), numbers)
    graph = (
        f", ONNX graph identical in structure ({graphs[0].node_count} nodes, opset {graphs[0].opset.get('', '?')})"
        if graphs is not None
        else f"; graph not compared ({graph_skip})"
    )
    return StageResult(
        "cost",
        "pass",
        0.0,
        f"same as the plain reference: {p_plain:,} params, {f_plain:,} FLOPs at batch 1{graph}",
        numbers,
    )
