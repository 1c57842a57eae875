"""The one place where `W + λ·W_aux` is computed.

The in-memory fold (`mmsurgery.pathway.fold`), the streaming file fold and the tests all call `fold_weight`, so
there is exactly one definition of what folding means. `effective_weight` is the same expression in the
training forward; for float32 weights the two agree bit for bit, which is what makes a fold exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmsurgery.errors import FoldError

__all__ = ["effective_weight", "fold_weight"]


def _check_scale(scale: Tensor, name: str) -> None:
    if scale.numel() != 1:
        raise FoldError(
            f"{name or 'layer'}: cross_modal_scale must hold one value (shape [1] or []), got shape {list(scale.shape)}"
        )


def effective_weight(weight: Tensor, scale: Tensor, aux_weight: Tensor) -> Tensor:
    """`weight + scale * aux_weight` in the weight's own dtype, for the training forward.

    No float32 upcast, so autocast and low-precision training see the dtype they expect and autograd reaches
    all three inputs. λ is usually kept in float32 for precise optimizer updates; it is cast to the weight's
    dtype here (a no-op for float32).

    Where all three share one dtype (float32 training) this runs as one `autograd.Function`: the forward is the
    same two roundings as `fold_weight` (`λ·W_aux`, then `+ W`, added in place into the product: addition
    commutes, so the bits are the same) and keeps no extra tensor; the backward passes ∂W = G through without a
    copy, computes ∂λ = Σ G⊙W_aux as one dot product (no weight-sized temporary) and ∂W_aux = λ·G only when
    W_aux trains — a frozen W_aux gets no gradient and costs no weight-sized pass in the backward. Otherwise
    (bf16/fp16 weights with a float32 λ, tensor subclasses) it is the plain autograd expression.
    """
    if _fast_path(weight, scale, aux_weight):
        return _PathwayWeight.apply(weight, scale, aux_weight)
    return weight + scale.to(weight.dtype) * aux_weight


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
    weight: Tensor, scale: Tensor, aux_weight: Tensor, *, name: str = "", out: Tensor | None = None
) -> Tensor:
    """Fold one pathway: `W + λ·W_aux` computed in float32, checked finite, cast back to `weight.dtype`.

    The expression and its order match `effective_weight` so that for float32 weights the folded weight is
    bit-identical to the one the unfolded forward uses. Inputs are never modified (they may be mmap-backed);
    a new tensor is returned, or `out` (a float32 tensor of the weight's shape, reused by the streaming fold to
    avoid fresh allocations; it may be `aux_weight` itself when the caller owns that buffer: the product is
    computed elementwise in place, the same bits). Raises `FoldError` naming `name` for a non-finite λ, a non-finite result, or a
    result that overflows the stored dtype.
    """
    label = name or "layer"
    if scale is None or aux_weight is None:  # e.g. a missing key looked up with .get()
        missing = "cross_modal_scale" if scale is None else "aux_weight"
        raise FoldError(f"{label}: {missing} is missing; a pathway needs both aux_weight and cross_modal_scale")
    _check_scale(scale, label)
    if weight.shape != aux_weight.shape:
        raise FoldError(f"{label}: aux_weight shape {list(aux_weight.shape)} != weight shape {list(weight.shape)}")
    if not torch.isfinite(scale).all():
        raise FoldError(f"{label}: cross_modal_scale is not finite ({scale.flatten().tolist()}); not folding")
    with torch.no_grad():
        if out is None:
            folded = weight.float() + scale.float() * aux_weight.float()
        else:
            folded = torch.mul(scale.float(), aux_weight.float(), out=out)
            folded = torch.add(weight.float(), folded, out=out)
        if not _all_finite(folded):
            raise FoldError(f"{label}: W + λ·W_aux is not finite (a non-finite W or W_aux, or an overflow)")
        if folded.dtype == weight.dtype:
            return folded  # float() returned the inputs themselves, so `folded` is already a fresh tensor
        cast = folded.to(weight.dtype)
        if not _all_finite(cast):
            raise FoldError(f"{label}: W + λ·W_aux overflows {weight.dtype}; keep the checkpoint in float32")
        return cast


def _all_finite(t: Tensor) -> bool:
    """Exact, and one cheap pass in the common case: any inf or nan makes the sum non-finite (inf - inf is nan),
    so a finite sum proves every element finite; a non-finite sum (a bad element, or an overflow of the sum
    itself) is decided element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
