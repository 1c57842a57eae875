"""The pathway's `autograd.Function` (`foldmath.effective_weight` for same-dtype inputs): forward bit-identical to
the fold, gradients of W, λ and W_aux equal to autograd's reference expression, a frozen W_aux without gradient."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from pathway_fixtures import batch, make_paired_state, tiny_vit
from torch import Tensor, nn

from mmsurgery.foldmath import effective_weight, fold_weight
from mmsurgery.pathway import Pathway, attach, pathway_modules


def _reference(weight: Tensor, scale: Tensor, aux: Tensor) -> Tensor:
    """What autograd differentiates when the pathway is written as one expression (effective_weight before)."""
    return weight + scale.to(weight.dtype) * aux


def _params(
    shape: tuple[int, int] = (96, 40), dtype: torch.dtype = torch.float32, *, aux_grad: bool = True, lam: float = -0.37
) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, Tensor]:
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    aux = nn.Parameter(torch.randn(shape, generator=gen).to(dtype), requires_grad=aux_grad)
    scale = nn.Parameter(torch.tensor([lam], dtype=torch.float32 if dtype != torch.float64 else dtype))
    upstream = torch.randn(shape, generator=gen).to(dtype)
    return weight, scale, aux, upstream


def _grads(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor], weight: Tensor, scale: Tensor, aux: Tensor, upstream: Tensor
) -> list[Tensor | None]:
    for p in (weight, scale, aux):
        p.grad = None
    out = fn(weight, scale, aux)
    out.backward(upstream)
    grads = [p.grad for p in (weight, scale, aux)]
    for p in (weight, scale, aux):
        p.grad = None
    return grads


@pytest.mark.parametrize("lam", [-0.37, 1e-3, 2.5])
def test_forward_is_bit_identical_to_fold_and_reference(lam: float) -> None:
    weight, scale, aux, _ = _params(lam=lam)
    out = effective_weight(weight, scale, aux)
    assert type(out.grad_fn).__name__ == "_PathwayWeightBackward"  # the Function, not the fallback expression
    assert torch.equal(out, fold_weight(weight, scale, aux))
    assert torch.equal(out, _reference(weight, scale, aux))
    assert not torch.equal(out, weight)


def test_gradients_equal_autograd_reference() -> None:
    weight, scale, aux, upstream = _params()
    new = _grads(effective_weight, weight, scale, aux, upstream)
    ref = _grads(_reference, weight, scale, aux, upstream)
    # ∂W = G and ∂W_aux = G·λ are the same single float32 operations as autograd's: exact.
    assert torch.equal(new[0], ref[0]) and torch.equal(new[2], ref[2])
    # ∂λ = Σ G⊙W_aux: a dot product instead of mul + sum, so only the summation order differs; relative to
    # Σ|G⊙W_aux| (3840 terms) float32 reordering stays far below 1e-6.
    bound = float((upstream * aux.detach()).abs().sum())
    assert new[1] is not None and new[1].shape == scale.shape and new[1].dtype == torch.float32
    assert abs(float(new[1] - ref[1])) <= 1e-6 * bound
    assert abs(float(new[1])) > 1e-3 * bound  # not trivially zero


def test_frozen_aux_gets_no_gradient() -> None:
    weight, scale, aux, upstream = _params(aux_grad=False)
    new = _grads(effective_weight, weight, scale, aux, upstream)
    ref = _grads(_reference, weight, scale, aux, upstream)
    assert new[2] is None and ref[2] is None
    assert torch.equal(new[0], ref[0])
    torch.testing.assert_close(new[1], ref[1], rtol=1e-5, atol=0)


def test_only_lambda_trains() -> None:
    weight, scale, aux, upstream = _params(aux_grad=False)
    weight.requires_grad_(False)
    grads = _grads(effective_weight, weight, scale, aux, upstream)
    assert grads[0] is None and grads[2] is None
    torch.testing.assert_close(grads[1], (upstream * aux).sum().reshape(1), rtol=1e-5, atol=0)


def test_gradcheck_in_float64() -> None:
    # Same-dtype float64 inputs take the Function too; gradcheck compares against finite differences.
    weight, scale, aux, _ = _params((5, 3), torch.float64)
    assert type(effective_weight(weight, scale, aux).grad_fn).__name__ == "_PathwayWeightBackward"
    assert torch.autograd.gradcheck(effective_weight, (weight, scale, aux))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_keep_the_autograd_expression(dtype: torch.dtype) -> None:
    # A float32 λ with bf16/fp16 weights: the expression as before, so values and gradients are unchanged.
    weight, scale, aux, upstream = _params(dtype=dtype)
    out = effective_weight(weight, scale, aux)
    assert out.dtype == dtype and type(out.grad_fn).__name__ != "_PathwayWeightBackward"
    assert torch.equal(out, _reference(weight, scale, aux))
    new = _grads(effective_weight, weight, scale, aux, upstream)
    ref = _grads(_reference, weight, scale, aux, upstream)
    assert all(torch.equal(a, b) for a, b in zip(new, ref, strict=True))
    assert new[1].dtype == torch.float32


def _reference_model(aux_trainable: bool) -> nn.Module:
    model = attach(tiny_vit(), make_paired_state(tiny_vit()), aux_trainable=aux_trainable)
    with torch.no_grad():
        for i, pw in enumerate(pathway_modules(model).values()):
            pw.cross_modal_scale.fill_(0.1 * (i + 1))
    return model


def _use_reference(model: nn.Module) -> nn.Module:
    for pw in pathway_modules(model).values():
        pw.forward = types.MethodType(lambda self, w: _reference(w, self.cross_modal_scale, self.aux_weight), pw)
    return model


@pytest.mark.parametrize("aux_trainable", [True, False])
def test_model_step_gradients_match_reference(aux_trainable: bool) -> None:
    x, y = batch()
    new = _reference_model(aux_trainable).train()
    ref = _use_reference(_reference_model(aux_trainable)).train()
    assert isinstance(next(iter(pathway_modules(ref).values())), Pathway)
    out_new, out_ref = new(x), ref(x)
    assert torch.equal(out_new, out_ref)  # the same weights bit for bit, so the same forward
    F.cross_entropy(out_new, y).backward()
    F.cross_entropy(out_ref, y).backward()
    for (name, p), (_, q) in zip(new.named_parameters(), ref.named_parameters(), strict=True):
        if not p.requires_grad:
            assert p.grad is None and q.grad is None, name
            continue
        if name.endswith("cross_modal_scale"):
            # ∂λ sums ~4k terms that partly cancel; the dot product adds them in another order than autograd's
            # mul + sum, which moves float32 results by up to ~1e-5 relative (measured: 7e-6).
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=0, msg=name)
        else:  # everything else sees bit-identical weights and upstream gradients
            assert torch.equal(p.grad, q.grad), name
    scale_grads = [pw.cross_modal_scale.grad for pw in pathway_modules(new).values()]
    assert all(g is not None and g.abs().item() > 0 for g in scale_grads)
    aux_grads = [pw.aux_weight.grad for pw in pathway_modules(new).values()]
    assert all((g is not None) == aux_trainable for g in aux_grads)
