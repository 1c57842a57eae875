"""What a pathway module looks like from outside: its state-dict names and its class.

State-dict keys follow a fixed, M2PT-compatible convention, for each pathway module at path `P`: `P.weight` (the
original W), `P.bias` (if any), `P.aux_weight`, `P.cross_modal_scale` (shape [1]), and `P.aux_weight_k`,
`P.cross_modal_scale_k` for further auxiliaries. Hooks on the module (`register_state_hooks`) translate to and
from parametrize's internal names (`P.parametrizations.weight.original`, ...), so a paired checkpoint file and
`model.state_dict()` are interchangeable and both load with `strict=True`.

parametrize makes one class per module and keeps its properties (`weight`) on it; `own_class` gives a pathway
module a class of its own that copies and pickles by rebuilding a class of its own again, so copies (an EMA) fold
independently and `torch.save(model)` loads back. Pickles name `_rebuild_parametrized` and the three hooks by
their place in `mmsurgery.pathway`, where the package re-exports them (see its `__init__`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from mmsurgery.paired_format import SCALE_SUFFIX, aux_suffix, scale_suffix
from mmsurgery.pathway.parametrization import Pathway, pathway_of
from mmsurgery.pathway.sharding import shard_like

__all__ = ["own_class", "register_state_hooks"]


def _public_to_internal(pw: Pathway) -> dict[str, str]:
    """`weight`/`aux_weight*`/`cross_modal_scale*` → parametrize's names for this module's pathway."""
    names = {"weight": "parametrizations.weight.original"}
    for k in range(pw.num_aux):
        for name in (aux_suffix(k), scale_suffix(k)):
            names[name] = f"parametrizations.weight.0.{name}"
    return names


# ---- the class: copies and pickles ---------------------------------------------------------------------------
def own_class(module: nn.Module) -> None:
    """Give a parametrized `module` a class of its own, as parametrize made it, plus the pathway's public names.

    parametrize makes one class per module and keeps its properties (`weight`) on it, but `copy.deepcopy` (every
    EMA: `AveragedModel`, timm's `ModelEmaV3`) shares that class with the copy, and folding one copy (which deletes
    `weight` from the class) broke all the others. The class made here copies and pickles through
    `_reduce_parametrized`, so every copy, and a module `torch.load` rebuilds, gets a class of its own too."""
    _set_class(module, *_class_args(module))


def _class_args(module: nn.Module) -> tuple[type, tuple[str, ...], tuple[str, ...]]:
    """(original class, parametrized tensor names, the pathway's public names) of a parametrized module."""
    pw = pathway_of(module)
    public = tuple(name for name in _public_to_internal(pw) if name != "weight") if pw is not None else ()
    return parametrize.type_before_parametrizations(module), tuple(module.parametrizations), public  # type: ignore[arg-type]


def _set_class(module: nn.Module, base: type, tensors: tuple[str, ...], public: tuple[str, ...]) -> None:
    """`public` (`aux_weight`, `cross_modal_scale`, ...: the names `state_dict()` shows) are read-only properties,
    always live (torch's `distributed.checkpoint` state-dict APIs walk each key with `getattr`), never registered as
    parameters, so nothing is counted twice; they go away with the class when the pathway is folded."""
    namespace: dict[str, Any] = {"__reduce_ex__": _reduce_parametrized}
    for name in public:
        namespace[name] = property(lambda self, n=name: getattr(self.parametrizations.weight[0], n))
    module.__class__ = type(f"Parametrized{base.__name__}", (base,), namespace)
    for name in tensors:  # torch's own property (a private helper), bound to this module: its `cached()` key
        parametrize._inject_property(module, name)


def _reduce_parametrized(self: nn.Module, protocol: int) -> Any:
    """How `copy.deepcopy`, `copy.copy` and pickle (`torch.save(model)`) take a module with a class from
    `own_class`: rebuilt from its original class by `_rebuild_parametrized`, then given its state as any module."""
    if vars(type(self)).get("__reduce_ex__") is not _reduce_parametrized:  # a class made later on top (FSDP2's)
        return object.__reduce_ex__(self, protocol)
    return (_rebuild_parametrized, _class_args(self), self.__getstate__())


def _rebuild_parametrized(base: type, tensors: tuple[str, ...], public: tuple[str, ...]) -> nn.Module:
    """A module of class `base`, without state yet, with a class of its own (pickles name this function)."""
    module = base.__new__(base)
    _set_class(module, base, tensors, public)
    return module


# ---- the state-dict names ------------------------------------------------------------------------------------
def register_state_hooks(module: nn.Module) -> list[RemovableHandle]:
    """Register the hooks that show `module`'s pathway under its public names in `state_dict()` and load it from
    them; the handles remove them again (`fold`)."""
    return [
        module.register_state_dict_post_hook(_state_dict_post_hook),
        module.register_load_state_dict_pre_hook(_load_pre_hook),
        module.register_load_state_dict_post_hook(_load_post_hook),
    ]


def _state_dict_post_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Rename parametrize's internal keys to `weight`/`aux_weight`/`cross_modal_scale` (order W, b, then aux and λ
    per auxiliary)."""
    pw = pathway_of(module)
    if pw is None or prefix + "parametrizations.weight.original" not in state_dict:
        return
    names = _public_to_internal(pw)
    weight = state_dict.pop(prefix + names["weight"])
    own = [prefix + n for n in (*module._parameters, *module._buffers) if prefix + n in state_dict]
    moved = {k: state_dict.pop(k) for k in own}
    extra = {
        prefix + public: state_dict.pop(prefix + internal)
        for public, internal in names.items()
        if public != "weight" and prefix + internal in state_dict
    }
    state_dict[prefix + "weight"] = weight
    state_dict.update(moved)
    state_dict.update(extra)


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    """Rename public keys to parametrize's internal ones; a 0-d λ is accepted as shape [1]. Where both are
    present the public key wins: torch's `set_model_state_dict` adds the internal names with the model's current
    values next to the public ones it was given. With `full_state_dict=True` under FSDP2 it gives every rank the
    full tensors and shards those of the names it knows itself; the public ones are sharded here the same way,
    from the local full tensor (no communication)."""
    pw = pathway_of(module)
    if pw is None:
        return
    for public, internal in _public_to_internal(pw).items():
        if prefix + public in state_dict:
            value = state_dict.pop(prefix + public)
            if public.startswith(SCALE_SUFFIX) and isinstance(value, Tensor) and value.ndim == 0:
                value = value.reshape(1)
            state_dict[prefix + internal] = shard_like(module.get_parameter(internal), value)


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    """Report missing/unexpected keys under their public names, not parametrize's."""
    pw = pathway_of(module)
    if pw is None:
        return
    names = _public_to_internal(pw)
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        for i, key in enumerate(keys):
            for public, internal in names.items():
                if key == internal or key.endswith("." + internal):
                    keys[i] = key[: len(key) - len(internal)] + public
