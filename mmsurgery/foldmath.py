"""The one place where `W + Σₖ λₖ·W_auxₖ` is computed.

The in-memory fold (`mmsurgery.pathway.fold`), the streaming file fold and the tests all call `fold_weight`, so
there is exactly one definition of what folding means. `effective_weight` is the same expression in the
training forward; for float32 weights the two agree bit for bit, which is what makes a fold exact.

Several auxiliaries are added left to right, `((W + λ₀·A₀) + λ₁·A₁) + …`, one rounding per product and per sum.
λ holds one value or one per block of W (`paired_format.scale_problem`); a finer λ is multiplied through
`paired_format.block_view`, the same single rounding per element as with one value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmsurgery.errors import FoldError
from mmsurgery.paired_format import AUX_SUFFIX, SCALE_SUFFIX, block_view, scale_problem

__all__ = ["all_finite", "effective_weight", "fold_weight"]


Tensors = Tensor | Sequence[Tensor]


def _listed(t: Tensors) -> list[Tensor]:
    return [t] if isinstance(t, Tensor) else list(t)


def scaled(scale: Tensor, aux_weight: Tensor, out: Tensor | None = None) -> Tensor:
    """`λ·W_aux`, with λ one value or one per block of W_aux (`paired_format.block_view`)."""
    if scale.numel() == 1 or scale.shape == aux_weight.shape:
        return torch.mul(scale, aux_weight) if out is None else torch.mul(scale, aux_weight, out=out)
    w_view, s_view = block_view(aux_weight.shape, scale.shape)
    if out is None:
        return (scale.reshape(s_view) * aux_weight.reshape(w_view)).reshape(aux_weight.shape)
    torch.mul(scale.reshape(s_view), aux_weight.reshape(w_view), out=out.view(w_view))
    return out


def effective_weight(weight: Tensor, scale: Tensors, aux_weight: Tensors) -> Tensor:
    """`weight + Σₖ scaleₖ * aux_weightₖ` in the weight's own dtype, for the training forward.

    No float32 upcast, so autocast and low-precision training see the dtype they expect and autograd reaches
    all three inputs. λ is usually kept in float32 for precise optimizer updates; it is cast to the weight's
    dtype here (a no-op for float32).

    Where all three share one dtype (float32 training) this runs as one `autograd.Function`: the forward is the
    same two roundings as `fold_weight` (`λ·W_aux`, then `+ W`, added in place into the product: addition
    commutes, so the bits are the same) and keeps no extra tensor; the backward passes ∂W = G through without a
    copy, computes ∂λ = Σ G⊙W_aux as one dot product (no weight-sized temporary) and ∂W_aux = λ·G only when
    W_aux trains — a frozen W_aux gets no gradient and costs no weight-sized pass in the backward. Otherwise
    (bf16/fp16 weights with a float32 λ, tensor subclasses, several auxiliaries, a finer λ) it is the plain
    autograd expression, the auxiliaries added left to right.
    """
    scales, auxes = _listed(scale), _listed(aux_weight)
    if len(scales) == 1 and _fast_path(weight, scales[0], auxes[0]):
        return _PathwayWeight.apply(weight, scales[0], auxes[0])
    merged = weight
    for s, a in zip(scales, auxes, strict=True):
        merged = merged + scaled(s.to(weight.dtype), a)
    return merged


def _fast_path(weight: Tensor, scale: Tensor, aux_weight: Tensor) -> bool:
    plain = (Tensor, torch.nn.Parameter)
    return (
        type(weight) in plain
        and type(scale) in plain
        and type(aux_weight) in plain
        and weight.dtype == scale.dtype == aux_weight.dtype
        and scale.numel() == 1
        and weight.shape == aux_weight.shape
    )


class _PathwayWeight(torch.autograd.Function):
    """`W + λ·W_aux` with its three gradients computed in as few weight-sized passes as the math allows."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor, scale: Tensor, aux_weight: Tensor) -> Tensor:  # type: ignore[override]
        return torch.mul(scale, aux_weight).add_(weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        _weight, scale, aux_weight = inputs
        ctx.save_for_backward(scale, aux_weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        scale, aux_weight = ctx.saved_tensors
        need_weight, need_scale, need_aux = ctx.needs_input_grad
        grad_scale = None
        if need_scale:
            grad_scale = torch.dot(grad.reshape(-1), aux_weight.reshape(-1)).reshape(scale.shape)
        grad_aux = grad * scale if need_aux else None
        return (grad if need_weight else None), grad_scale, grad_aux


def fold_weight(
    weight: Tensor, scale: Tensors, aux_weight: Tensors, *, name: str = "", out: Tensor | None = None
) -> Tensor:
    """Fold one pathway: `W + Σₖ λₖ·W_auxₖ` computed in float32, checked finite, cast back to `weight.dtype`.
    `scale` and `aux_weight` are one tensor each, or one per auxiliary, in the same order.

    The expression and its order match `effective_weight` so that for float32 weights the folded weight is
    bit-identical to the one the unfolded forward uses. Inputs are never modified (they may be mmap-backed);
    a new tensor is returned, or `out` (a float32 tensor of the weight's shape, reused by the streaming fold to
    avoid fresh allocations; it may be `aux_weight` itself when the caller owns that buffer: the product is
    computed elementwise in place, the same bits; only the first auxiliary's product goes there).
    Raises `FoldError` naming `name` for a W or W_aux that is not floating point (an integer W would truncate the
    sum), a non-finite λ, a non-finite result, or a result that overflows the stored dtype.
    """
    label = name or "layer"
    if scale is None or aux_weight is None:  # e.g. a missing key looked up with .get()
        missing = SCALE_SUFFIX if scale is None else AUX_SUFFIX
        raise FoldError(f"{label}: {missing} is missing; a pathway needs both aux_weight and cross_modal_scale")
    scales, auxes = _listed(scale), _listed(aux_weight)
    if len(scales) != len(auxes) or not scales:
        raise FoldError(f"{label}: {len(auxes)} aux_weight(s) but {len(scales)} cross_modal_scale(s)")
    for s, a in zip(scales, auxes, strict=True):
        if s is None or a is None:
            raise FoldError(f"{label}: a pathway needs both aux_weight and cross_modal_scale for every auxiliary")
        if weight.shape != a.shape:
            raise FoldError(f"{label}: aux_weight shape {list(a.shape)} != weight shape {list(weight.shape)}")
        for what, t in (("weight", weight), (AUX_SUFFIX, a)):
            if not t.is_floating_point():
                raise FoldError(
                    f"{label}: {what} is {str(t.dtype).removeprefix('torch.')}, not floating point; W + λ·W_aux "
                    "cannot be stored in it without truncation (a pathway folds floating-point weights only)"
                )
        why = scale_problem(s.shape, weight.shape)
        if why is not None:
            raise FoldError(f"{label}: cross_modal_scale {why}")
        if not torch.isfinite(s).all():
            raise FoldError(f"{label}: cross_modal_scale is not finite ({s.flatten().tolist()[:8]}); not folding")
    with torch.no_grad():
        if out is None:
            folded = weight.float() + scaled(scales[0].float(), auxes[0].float())
        else:
            folded = scaled(scales[0].float(), auxes[0].float(), out=out)
            folded = torch.add(weight.float(), folded, out=out)
        for s, a in zip(scales[1:], auxes[1:], strict=True):
            folded = folded.add_(scaled(s.float(), a.float()))  # folded is fresh (or `out`): in place, same bits
        if not all_finite(folded):
            raise FoldError(f"{label}: W + λ·W_aux is not finite (a non-finite W or W_aux, or an overflow)")
        if folded.dtype == weight.dtype:
            return folded  # float() returned the inputs themselves, so `folded` is already a fresh tensor
        cast = folded.to(weight.dtype)
        if not all_finite(cast):
            raise FoldError(f"{label}: W + λ·W_aux overflows {weight.dtype}; keep the checkpoint in float32")
        return cast


def all_finite(t: Tensor) -> bool:
    """Exact, and one cheap pass in the common case: any inf or nan makes the sum non-finite (inf - inf is nan),
    so a finite sum proves every element finite; a non-finite sum (a bad element, or an overflow of the sum
    itself) is decided element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
