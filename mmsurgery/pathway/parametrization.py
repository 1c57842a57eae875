"""The pathway as a `torch.nn.utils.parametrize` parametrization: `Pathway` makes `module.weight` return
`W + Σₖ λₖ·W_auxₖ` (`foldmath.effective_weight`, whose `autograd.Function` computes the gradients), and
`pathway_of` finds it on a module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from mmsurgery.errors import AttachError
from mmsurgery.foldmath import effective_weight
from mmsurgery.paired_format import aux_suffix, scale_suffix
from mmsurgery.per_aux import per_aux

__all__ = ["Pathway", "pathway_of"]


class Pathway(nn.Module):
    """Parametrization `W ↦ W + Σₖ λₖ·W_auxₖ` with each `W_auxₖ` and λₖ (float32) as parameters.

    One auxiliary (the paper's case) gives `aux_weight` and `cross_modal_scale` (shape [1]); the k-th further one
    `aux_weight_k` and `cross_modal_scale_k` (`paired_format`). λ may hold one value per block of W
    (`scale_shapes`: per qkv chunk, per output channel). `W_aux` is always an `nn.Parameter`, never a buffer:
    frozen means `requires_grad=False`, so DDP neither all-reduces nor re-broadcasts it on every forward.
    """

    def __init__(
        self,
        aux_weight: Tensor | Sequence[Tensor],
        *,
        aux_trainable: bool | Sequence[bool] = True,
        init_scale: float | Sequence[float] = 0.0,
        scale_shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        auxes = [aux_weight] if isinstance(aux_weight, Tensor) else list(aux_weight)
        n = len(auxes)
        trainable = per_aux(aux_trainable, n, "aux_trainable", error=AttachError)
        inits = per_aux(init_scale, n, "init_scale", error=AttachError)
        shapes = [(1,)] * n if scale_shapes is None else [tuple(s) for s in scale_shapes]
        self.num_aux = n
        for k, aux in enumerate(auxes):
            setattr(self, aux_suffix(k), nn.Parameter(aux, requires_grad=trainable[k]))
            scale = torch.full(shapes[k], float(inits[k]), dtype=torch.float32, device=aux.device)
            setattr(self, scale_suffix(k), nn.Parameter(scale))
        self._handles: list[RemovableHandle] = []  # the state-dict hooks `attach` registers; `fold` removes them
        self._param_order: tuple[str, ...] = ("weight",)  # the module's parameter order before attaching

    @property
    def aux_weights(self) -> list[nn.Parameter]:
        return [getattr(self, aux_suffix(k)) for k in range(self.num_aux)]

    @property
    def scales(self) -> list[nn.Parameter]:
        return [getattr(self, scale_suffix(k)) for k in range(self.num_aux)]

    def forward(self, weight: Tensor) -> Tensor:
        if self.num_aux == 1:
            return effective_weight(weight, self.cross_modal_scale, self.aux_weight)
        return effective_weight(weight, self.scales, self.aux_weights)

    def extra_repr(self) -> str:
        shapes = [list(a.shape) for a in self.aux_weights]
        trainable = [a.requires_grad for a in self.aux_weights]
        if self.num_aux == 1:
            return f"aux_weight={shapes[0]}, aux_trainable={trainable[0]}"
        return f"aux_weights={shapes}, aux_trainable={trainable}"


def pathway_of(module: nn.Module) -> Pathway | None:
    """The `Pathway` parametrizing `module.weight` (first in its parametrization list), or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]  # type: ignore[index]
    return plist[0] if len(plist) and isinstance(plist[0], Pathway) else None
