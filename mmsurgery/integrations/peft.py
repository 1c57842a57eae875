"""PEFT adapters (LoRA, ...) on a model with the pathway: fold first, then merge.

Training works as it is: `get_peft_model` on an attached model wraps the pathway modules, freezes λ and `W_aux`
with the rest of the base model, and the adapter trains on top of `W + λ·W_aux`. Merging does not: PEFT merges an
adapter by editing the base layer's weight in place (`base_layer.weight.data += delta`), and a pathway module's
`weight` is recomputed from W, λ and `W_aux` on every access, so the edit lands in a temporary tensor and is lost.
`peft_model.merge_and_unload()` then returns the adapter-disabled model, with no error.

Folding first is exact: `pathway.fold(peft_model)` reaches the pathway modules under the adapter wrappers and
turns them into plain linears, and PEFT's merge into a plain weight is correct. `merge_and_unload` here does both.
A bare `peft_model.merge_and_unload()` can be neither repaired nor detected from mmsurgery's side without patching
PEFT: the edit goes through `.data` (no autograd version bump) into a tensor nobody keeps. What can be detected
is an adapter PEFT already marked as merged into a pathway weight (`peft_model.merge_adapter()`): `pathway.fold`,
and so `merge_and_unload`, refuse it.

peft is imported only if it is already loaded (`is_peft_model`) or when `merge_and_unload` checks its argument.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from mmsurgery.errors import BadInputError
from mmsurgery.pathway import fold

__all__ = ["is_peft_model", "merge_and_unload"]


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `PeftModel` or `PeftMixedModel` (without importing peft if it is not loaded)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftMixedModel, PeftModel

    return isinstance(model, (PeftModel, PeftMixedModel))


def merge_and_unload(
    model: nn.Module,
    *,
    progressbar: bool = False,
    safe_merge: bool = False,
    adapter_names: Sequence[str] | None = None,
) -> nn.Module:
    """Fold every pathway of a PEFT model, under the adapters too, then merge the adapters with PEFT's own
    `merge_and_unload`; returns the plain base model (no pathway, no adapter), as PEFT's does.

    `model` is a `PeftModel`, `PeftMixedModel` or a PEFT tuner (`peft_model.base_model`); the keyword arguments
    are PEFT's. λ and `W_aux` are folded with their current values, trained or not. The fold is checked before
    anything changes (`FoldError`: a non-finite λ or folded weight, or an adapter already merged into a pathway
    weight by `merge_adapter()`, whose merge was lost: call `unmerge_adapter()` first). If PEFT's merge then
    fails (`safe_merge` finding NaNs), the model is left folded with its adapters unmerged, which computes the
    same function as before.
    """
    try:
        from peft import PeftMixedModel, PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError as exc:
        raise BadInputError("merging a PEFT adapter needs peft: pip install 'mmsurgery[peft]'") from exc
    if not isinstance(model, (PeftModel, PeftMixedModel, BaseTuner)):
        raise BadInputError(
            f"{type(model).__name__} is not a PEFT model: nothing to merge (pathway.fold(model) folds the pathway)"
        )
    fold(model)
    names = list(adapter_names) if adapter_names is not None else None
    return model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=names)
