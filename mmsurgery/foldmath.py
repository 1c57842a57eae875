"""The one place where `W + λ·W_aux` is computed.

The in-memory fold (`mmsurgery.pathway.fold`), the streaming file fold and the tests all call `fold_weight`, so
there is exactly one definition of what folding means. `effective_weight` is the same expression in the
training forward; for float32 weights the two agree bit for bit, which is what makes a fold exact.
"""

from __future__ import annotations

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
    """
    return weight + scale.to(weight.dtype) * aux_weight


def fold_weight(
    weight: Tensor, scale: Tensor, aux_weight: Tensor, *, name: str = "", out: Tensor | None = None
) -> Tensor:
    """Fold one pathway: `W + λ·W_aux` computed in float32, checked finite, cast back to `weight.dtype`.

    The expression and its order match `effective_weight` so that for float32 weights the folded weight is
    bit-identical to the one the unfolded forward uses. Inputs are never modified (they may be mmap-backed);
    a new tensor is returned, or `out` (a float32 tensor of the weight's shape, reused by the streaming fold to
    avoid fresh allocations). Raises `FoldError` naming `name` for a non-finite λ, a non-finite result, or a
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
