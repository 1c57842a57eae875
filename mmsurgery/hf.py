"""Hugging Face checkpoint names: what a `save_pretrained` folder holds on disk vs what the model has in memory.

transformers 5 renames weights while loading (`vit.encoder.layer.0.attention.attention.query` on disk becomes
`vit.layers.0.attention.q_proj` in the model) and renames them back when saving. mmsurgery keeps every file in
the on-disk names — a paired or folded file of an HF folder has the keys `save_pretrained` writes — and converts
only where a file meets a live model, with transformers' own rules (`get_model_conversion_mapping`), so the
pathway keys `P.aux_weight` / `P.cross_modal_scale` follow their `P.weight` both ways.

Only renamings are supported: a key that one of transformers' `WeightConverter`s (merging or splitting tensors,
e.g. MoE experts) would claim is refused, since a pathway is defined per stored linear. transformers is imported
lazily; every function is the identity for a model that is not a `PreTrainedModel`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from mmsurgery.errors import BadInputError

__all__ = ["is_hf_model", "to_disk_names", "to_model_names"]

T = TypeVar("T")


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (without importing transformers if it is not loaded)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _transforms(model: nn.Module, *, legacy: bool) -> tuple[list[Any], list[Any]]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model, add_legacy=legacy)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def to_model_names(model: nn.Module, state: Mapping[str, T]) -> dict[str, T]:
    """`state`'s keys as `model.state_dict()` names them: transformers' load-time renaming for an HF model (keys
    already in the model's names stay as they are), unchanged for any other model. Raises `BadInputError` when a
    key needs one of transformers' tensor converters, or when two keys would get the same name."""
    if not is_hf_model(model):
        return dict(state)
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _transforms(model, legacy=True)
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, T] = {}
    for key, value in state.items():
        if key in own:
            name = key
        else:
            name, converter = rename_source_key(key, renamings, converters, prefix, own)
            if converter is not None:
                raise BadInputError(
                    f"{key}: transformers converts this tensor on load ({converter}); mmsurgery pairs stored "
                    "linears one to one and cannot map a pathway through that conversion"
                )
        if name in out:
            raise BadInputError(f"{key}: two checkpoint keys become '{name}' in {type(model).__name__}")
        out[name] = value
    return out


def to_disk_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Model name → the name `save_pretrained` writes it under, for each of `names` (the inverse of
    `to_model_names`); the identity for a model that is not an HF model or has no renaming rules."""
    if not is_hf_model(model):
        return {n: n for n in names}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _transforms(model, legacy=False)
    reverse_renamings = [t.reverse_transform() for t in reversed(renamings)]
    reverse_converters = [t.reverse_transform() for t in reversed(converters)]
    out: dict[str, str] = {}
    for name in names:
        disk, converter = rename_source_key(name, reverse_renamings, reverse_converters, reverse=True)
        if converter is not None:
            raise BadInputError(f"{name}: transformers converts this tensor on save ({converter}); not supported")
        out[name] = disk
    return out
