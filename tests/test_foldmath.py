from __future__ import annotations

import pytest
import torch

from mmsurgery.errors import FoldError
from mmsurgery.foldmath import effective_weight, fold_weight


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=gen).to(dtype)
    aux = torch.randn(48, 32, generator=gen).to(dtype)
    return weight, torch.tensor([0.37]), aux


def test_fold_equals_forward_bit_for_bit_in_float32() -> None:
    # Exact (torch.equal): fold_weight and the forward evaluate the same float32 expression in the same order.
    weight, scale, aux = _inputs()
    folded = fold_weight(weight, scale, aux, name="l")
    assert torch.equal(folded, effective_weight(weight, scale, aux))
    assert not torch.equal(folded, weight)
    assert folded.dtype == torch.float32


def test_fold_is_out_of_place_and_detached() -> None:
    weight, scale, aux = _inputs()
    copies = [t.clone() for t in (weight, scale, aux)]
    w = torch.nn.Parameter(weight)
    folded = fold_weight(w, scale, aux)
    assert all(torch.equal(a, b) for a, b in zip((weight, scale, aux), copies, strict=True))
    assert folded.data_ptr() not in (weight.data_ptr(), aux.data_ptr())
    assert not folded.requires_grad


def test_zero_dim_scale_equals_shape_one() -> None:
    weight, scale, aux = _inputs()
    assert torch.equal(fold_weight(weight, scale.reshape(()), aux), fold_weight(weight, scale, aux))


def test_low_precision_weights_fold_in_float32_then_cast() -> None:
    # Exact: the documented result is the float32 fold rounded once to bfloat16.
    weight, scale, aux = _inputs(torch.bfloat16)
    folded = fold_weight(weight, scale, aux)
    assert folded.dtype == torch.bfloat16
    assert torch.equal(folded, (weight.float() + scale * aux.float()).to(torch.bfloat16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scale_names_the_layer(bad: float) -> None:
    weight, _scale, aux = _inputs()
    with pytest.raises(FoldError, match=r"blocks\.3\.attn\.qkv.*cross_modal_scale"):
        fold_weight(weight, torch.tensor([bad]), aux, name="blocks.3.attn.qkv")


def test_non_finite_weight_and_overflow() -> None:
    weight, scale, aux = _inputs()
    weight[0, 0] = float("nan")
    with pytest.raises(FoldError, match=r"mlp\.fc1.*not finite"):
        fold_weight(weight, scale, aux, name="mlp.fc1")
    big = torch.full((2, 2), 60000.0, dtype=torch.float16)
    with pytest.raises(FoldError, match="overflows"):
        fold_weight(big, torch.tensor([1.0]), big, name="x")


def test_bad_scale_and_shape() -> None:
    weight, _scale, aux = _inputs()
    with pytest.raises(FoldError, match="one value"):
        fold_weight(weight, torch.zeros(2), aux)
    with pytest.raises(FoldError, match="shape"):
        fold_weight(weight, torch.zeros(1), aux.t())
    with pytest.raises(FoldError, match=r"q: cross_modal_scale is missing"):
        fold_weight(weight, None, aux, name="q")  # type: ignore[arg-type]


def test_effective_weight_is_differentiable() -> None:
    weight, scale, aux = (torch.nn.Parameter(t) for t in _inputs())
    effective_weight(weight, scale, aux).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (weight, scale, aux))
