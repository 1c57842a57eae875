"""The fold stage: the folded model (PLAIN) computes what the trained model with its pathway (PAIRED, unfolded)
computed, in PyTorch, float32, eval mode, at each batch size.

The unfolded model is PAIRED's plain part with the pathway attached (`pathway.attach` from the opened PAIRED,
λ from the file). Before attaching, the same model is the target without pathway: its output at the first batch
size gives `pathway_effect_max_abs`, so a reader sees the comparison is not trivial. Only one model holding W and
W_aux is alive, and it is released before PLAIN's model is built; its outputs stay in the run context as the onnx
stage's reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmsurgery.errors import BadInputError
from mmsurgery.hf import to_model_names
from mmsurgery.paired_format import PairedCheckpoint, cross_modal_scale_key, scale_values
from mmsurgery.pathway import attach, scales
from mmsurgery.verify.compare import compare_batches, verdict
from mmsurgery.verify.context import PlainDoesNotLoad, RunContext, forward, free_memory
from mmsurgery.verify.report import StageResult

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FoldStageResult", "run"]


@dataclass(frozen=True, kw_only=True)
class FoldStageResult(StageResult):
    name: str = "fold"
    max_abs: float
    max_rel: float
    pathway_effect_max_abs: float

    def headline(self) -> list[tuple[str, object]]:
        return [("max abs", self.max_abs), ("max rel", self.max_rel), ("pathway effect", self.pathway_effect_max_abs)]


def _load_scales(model: nn.Module, paired: PairedCheckpoint) -> None:
    """λ of every pathway from PAIRED into the attached model (under the model's names)."""
    keys = [cross_modal_scale_key(p, k) for p, spec in paired.pathways.items() for k in range(spec.num_aux)]
    named = to_model_names(model, {k: paired.ck.get(k) for k in keys})
    result = model.load_state_dict(named, strict=False)
    if result.unexpected_keys:
        raise BadInputError(
            f"{paired.path}: does not load strictly into the model with its pathway: unexpected key(s) "
            f"{', '.join(result.unexpected_keys[:5])}"
        )


def run(ctx: RunContext) -> FoldStageResult:
    paired = ctx.paired
    assert paired is not None
    first = ctx.options.batch_sizes[0]  # the pathway's effect needs one batch, not all
    state = {k: paired.ck.get(k) for k in paired.plain_keys}
    try:
        model = ctx.build(state, paired.metadata, "unfolded")
    except PlainDoesNotLoad as exc:
        raise BadInputError(f"{paired.path}: its plain part does not load strictly into the model: {exc}") from None
    del state
    target_outputs = forward(ctx.arch.runnable(model), {first: ctx.inputs[first]})
    attach(model, paired)  # W_aux read one tensor at a time; names converted to the model's by attach
    _load_scales(model, paired)
    lam = scales(model)
    ctx.unfolded_outputs = forward(ctx.arch.runnable(model), ctx.inputs)
    del model  # W and W_aux: released before PLAIN's model is built
    free_memory()
    unfolded = ctx.unfolded_outputs
    tol = ctx.tol["fold"]
    ok, numbers, line = verdict(compare_batches(ctx.plain_outputs(), unfolded, tol), tol)
    effect = max(
        (
            float((u - t).abs().max()) if u.numel() and u.shape == t.shape else math.inf
            for u, t in zip(unfolded[first], target_outputs[first], strict=False)
        ),
        default=0.0,
    )
    numbers |= {
        "pathways": len(lam),
        "max_abs_lambda": max((abs(x) for v in lam.values() for x in scale_values(v)), default=0.0),
        "pathway_effect_max_abs": effect,
        "compared": "PLAIN (folded) vs PAIRED with its pathway (unfolded), PyTorch float32 eval",
        "pathway_effect_batch_size": first,
    }
    effect_line = f"the pathway moves the output by up to {effect:.3g} (unfolded vs target without it, batch {first})"
    if effect == 0:
        effect_line = "the pathway changes nothing (λ = 0?): this comparison is trivial"
    return FoldStageResult(
        status="pass" if ok else "fail",
        message=f"folded vs unfolded: {line}; {effect_line}",
        numbers=numbers,
        max_abs=numbers["max_abs"],
        max_rel=numbers["max_rel"],
        pathway_effect_max_abs=effect,
    )
