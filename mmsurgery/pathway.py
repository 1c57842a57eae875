"""The Multimodal Pathway on any `nn.Module`: attach, train, fold.

The pathway lives in the weight itself: `torch.nn.utils.parametrize` makes `module.weight` return
`W + λ·W_aux`, so code that reads the weight directly (VideoMAE's `F.linear(x, self.qkv.weight, ...)`, HF
`Conv1D`) sees the pathway exactly like `module(x)` does, and the forward is one matmul on the merged weight.

State-dict keys follow a fixed, M2PT-compatible convention, for each pathway module at path `P`:
`P.weight` (the original W), `P.bias` (if any), `P.aux_weight`, `P.cross_modal_scale` (shape [1]). Hooks on
the module translate to and from parametrize's internal names (`P.parametrizations.weight.original`, ...), so a
paired checkpoint file and `model.state_dict()` are interchangeable and both load with `strict=True`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from mmsurgery.checkpoint.dtypes import ITEMSIZE
from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.errors import AttachError, BadInputError, FoldError
from mmsurgery.foldmath import all_finite, effective_weight, fold_weight
from mmsurgery.hf import to_model_names
from mmsurgery.paired_format import (
    AUX_SUFFIX,
    SCALE_SUFFIX,
    LayerScales,
    PairedCheckpoint,
    aux_suffix,
    group_pathway_keys,
    open_paired,
    scale_entry,
    scale_problem,
    scale_suffix,
    split_paired,
)

__all__ = [
    "AUX_KEY",
    "SCALE_KEY",
    "Pathway",
    "attach",
    "fold",
    "is_attached",
    "param_groups",
    "pathway_modules",
    "scales",
    "split_paired",
]

AUX_KEY = AUX_SUFFIX  # the paired format's names (mmsurgery.paired_format), which state_dict() shows
SCALE_KEY = SCALE_SUFFIX
_MAX_LISTED = 8


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
        trainable = _per_aux(aux_trainable, n, "aux_trainable")
        inits = _per_aux(init_scale, n, "init_scale")
        shapes = [(1,)] * n if scale_shapes is None else [tuple(s) for s in scale_shapes]
        self.num_aux = n
        for k, aux in enumerate(auxes):
            setattr(self, aux_suffix(k), nn.Parameter(aux, requires_grad=trainable[k]))
            scale = torch.full(shapes[k], float(inits[k]), dtype=torch.float32, device=aux.device)
            setattr(self, scale_suffix(k), nn.Parameter(scale))
        self._handles: list[RemovableHandle] = []
        self._param_order: tuple[str, ...] = ("weight",)

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


def _per_aux(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (bool, int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise AttachError(f"{what}: {len(values)} value(s) for {n} auxiliary model(s)")
    return values


def _public_to_internal(pw: Pathway) -> dict[str, str]:
    """`weight`/`aux_weight*`/`cross_modal_scale*` → parametrize's names for this module's pathway."""
    names = {"weight": "parametrizations.weight.original"}
    for k in range(pw.num_aux):
        for name in (aux_suffix(k), scale_suffix(k)):
            names[name] = f"parametrizations.weight.0.{name}"
    return names


def _own_class(module: nn.Module) -> None:
    """Give a parametrized `module` a class of its own, as parametrize made it, plus the pathway's public names.

    parametrize makes one class per module and keeps its properties (`weight`) on it, but `copy.deepcopy` (every
    EMA: `AveragedModel`, timm's `ModelEmaV3`) shares that class with the copy, and folding one copy (which deletes
    `weight` from the class) broke all the others. The class made here copies and pickles through
    `_reduce_parametrized`, so every copy, and a module `torch.load` rebuilds, gets a class of its own too."""
    _set_class(module, *_class_args(module))


def _class_args(module: nn.Module) -> tuple[type, tuple[str, ...], tuple[str, ...]]:
    """(original class, parametrized tensor names, the pathway's public names) of a parametrized module."""
    pw = _pathway_of(module)
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
    `_own_class`: rebuilt from its original class by `_rebuild_parametrized`, then given its state as any module."""
    if vars(type(self)).get("__reduce_ex__") is not _reduce_parametrized:  # a class made later on top (FSDP2's)
        return object.__reduce_ex__(self, protocol)
    return (_rebuild_parametrized, _class_args(self), self.__getstate__())


def _rebuild_parametrized(base: type, tensors: tuple[str, ...], public: tuple[str, ...]) -> nn.Module:
    module = base.__new__(base)
    _set_class(module, base, tensors, public)
    return module


def _pathway_of(module: nn.Module) -> Pathway | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]  # type: ignore[index]
    return plist[0] if len(plist) and isinstance(plist[0], Pathway) else None


def _state_dict_post_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Rename parametrize's internal keys to `weight`/`aux_weight`/`cross_modal_scale` (order W, b, then aux and λ
    per auxiliary)."""
    pw = _pathway_of(module)
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
    pw = _pathway_of(module)
    if pw is None:
        return
    for public, internal in _public_to_internal(pw).items():
        if prefix + public in state_dict:
            value = state_dict.pop(prefix + public)
            if public.startswith(SCALE_KEY) and isinstance(value, Tensor) and value.ndim == 0:
                value = value.reshape(1)
            state_dict[prefix + internal] = _like_parameter(module.get_parameter(internal), value)


def _like_parameter(param: Tensor, value: Any) -> Any:
    """`value` sharded like `param` where `param` is a DTensor and `value` the full plain tensor; else `value`."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor) or not isinstance(value, Tensor) or isinstance(value, dtensor):
        return value
    if value.shape != param.shape:
        return value  # load_state_dict reports the shape mismatch
    from torch.distributed.tensor import distribute_tensor

    local = value.detach().to(param.device)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    """Report missing/unexpected keys under their public names, not parametrize's."""
    pw = _pathway_of(module)
    if pw is None:
        return
    names = _public_to_internal(pw)
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        for i, key in enumerate(keys):
            for public, internal in names.items():
                if key == internal or key.endswith("." + internal):
                    keys[i] = key[: len(key) - len(internal)] + public


@dataclass(frozen=True)
class _Stored:
    """A pathway tensor left in an open checkpoint: its shape from the header, its values read only when asked
    (`_values`), so attaching from a file holds one tensor of it at a time."""

    ck: Checkpoint
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ck.infos[self.name].shape


def _values(value: Tensor | _Stored) -> Tensor:
    """A stored tensor read into fresh memory this call owns (never a view of a mapped file: a trainable W_aux is
    updated in place), or the given tensor."""
    if not isinstance(value, _Stored):
        return value
    info = value.ck.info(value.name)
    buf = torch.empty(info.numel * ITEMSIZE[info.dtype], dtype=torch.uint8)
    return value.ck.read_into(value.name, buf)


def _open_for_attach(path: str | os.PathLike[str]) -> PairedCheckpoint:
    try:
        return open_paired(path)
    except FoldError as e:  # an inconsistent paired file: say so as attach does
        raise AttachError(f"cannot attach the pathway; the model was not changed: {e}") from None


def _format_problems(problems: list[str], what: str) -> str:
    """One line (the CLI prints errors as one line): the problems joined by "; "."""
    shown = "; ".join(problems[:_MAX_LISTED])
    more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"{what}; the model was not changed ({len(problems)} problem(s)): {shown}{more}"


def attach(
    model: nn.Module,
    paired: str | os.PathLike[str] | PairedCheckpoint | Mapping[str, Tensor],
    *,
    aux_trainable: bool | Sequence[bool] = True,
    init_scale: float | Sequence[float] = 0.0,
    layers: Iterable[str] | None = None,
) -> nn.Module:
    """Attach a pathway to every module `P` whose `P.aux_weight` and `P.cross_modal_scale` are in `paired` (and
    `P.aux_weight_k`/`P.cross_modal_scale_k` of further auxiliaries: `W + Σₖ λₖ·W_auxₖ`).

    `paired` is a path (opened with `paired_format.open_paired`, in any format `open_checkpoint` reads), an open
    `PairedCheckpoint`, or a state dict. From a file only the pathway tensors are read, one `W_aux` at a time,
    never the whole file; the file must be a consistent paired checkpoint (`find_pathways`), else `AttachError`.

    In place; returns `model`. Each `W_aux` is a copy of the paired tensor in the module weight's dtype and device;
    λ takes its shape from the file (one value, or one per qkv chunk or output channel: `mmsurgery pair --scale`)
    and starts at `init_scale` (λ's values from the file are NOT read: to resume, call
    `model.load_state_dict(hf.to_model_names(model, trained_paired), strict=True)` after attaching). Target
    weights are not loaded either. `aux_trainable` and `init_scale` take one value for every auxiliary or one per
    auxiliary. For a Hugging Face model `paired` may use the names on disk (what `save_pretrained` writes and
    `mmsurgery pair` keeps) or the model's own: pathway keys are renamed with transformers' rules
    (`hf.to_model_names`, the identity for other models); `layers` restricts the attach to some module paths, in
    the model's names. Everything is checked first (modules exist, have a `.weight` Parameter without
    parametrization, shapes match, values finite) and every `W_aux` copied before the first module changes; any
    problem raises `AttachError` listing them and leaves the model untouched. Attach before wrapping the model in
    DDP.
    """
    if isinstance(paired, (str, os.PathLike)):
        with _open_for_attach(paired) as opened:
            return attach(model, opened, aux_trainable=aux_trainable, init_scale=init_scale, layers=layers)
    found_in: Mapping[str, Tensor | _Stored]
    if isinstance(paired, PairedCheckpoint):
        found_in = {name: _Stored(paired.ck, name) for name in paired.pathway_keys}
    else:
        found_in = split_paired(paired)[1]
    try:
        state = to_model_names(model, found_in)
    except BadInputError as e:
        raise AttachError(f"cannot attach the pathway; the model was not changed: {e}") from None
    problems: list[str] = []
    found = group_pathway_keys(state)  # module -> auxiliary -> kind -> key
    num_aux = max((len(v) for v in found.values()), default=1)
    for label, what in (("aux_trainable", aux_trainable), ("init_scale", init_scale)):
        try:
            _per_aux(what, num_aux, label)
        except AttachError as e:
            problems.append(str(e))
    paths: list[str] = []
    for path, per_aux in found.items():
        indices = sorted(per_aux)
        if indices != list(range(len(indices))):
            problems.append(f"'{path}': auxiliaries numbered {indices}; expected 0..{len(indices) - 1}")
        elif len(indices) != num_aux:
            problems.append(f"'{path}': {len(indices)} auxiliary model(s), other layers have {num_aux}")
        else:
            half = [k for k in indices if len(per_aux[k]) != 2]
            for k in half:
                have, lack = (aux_suffix(k), scale_suffix(k))[:: 1 if "aux" in per_aux[k] else -1]
                problems.append(f"'{path}': has {have} but no {lack}")
            if not half:
                paths.append(path)
    if layers is not None:
        wanted = list(dict.fromkeys(layers))
        missing = [p for p in wanted if p not in paths]
        problems += [f"'{p}': asked for in layers but not a pathway of the paired checkpoint" for p in missing]
        paths = [p for p in wanted if p in paths]
    if not paths and not problems:
        problems.append(f"no pathway keys (`P.{AUX_KEY}` with `P.{SCALE_KEY}`) in the paired checkpoint")
    targets: list[tuple[nn.Module, list[Tensor], list[tuple[int, ...]]]] = []
    seen: dict[int, str] = {}
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"'{path}': no such module in the model")
            continue
        if id(module) in seen:
            problems.append(f"'{path}': same module object as '{seen[id(module)]}' (tied); attach one of them")
            continue
        seen[id(module)] = path
        weight = module._parameters.get("weight")
        if parametrize.is_parametrized(module, "weight"):
            kind = "a pathway" if _pathway_of(module) is not None else "a parametrization"
            problems.append(f"'{path}': weight already has {kind}; fold or remove it first")
            continue
        if not isinstance(weight, nn.Parameter):
            wrapped = isinstance(getattr(module, "base_layer", None), nn.Module)  # PEFT's adapter layers
            hint = (
                ": it wraps a base layer (a PEFT adapter?); attach the pathway before get_peft_model" if wrapped else ""
            )
            problems.append(f"'{path}': {type(module).__name__} has no `weight` Parameter{hint}")
            continue
        auxes = [state[found[path][k]["aux"]] for k in range(num_aux)]
        shapes = [tuple(state[found[path][k]["scale"]].shape) for k in range(num_aux)]
        copies = _aux_copies(weight, auxes, shapes)
        if isinstance(copies, str):
            problems.append(f"'{path}': {copies}")
        else:
            targets.append((module, copies, [s if s else (1,) for s in shapes]))
    if problems:
        raise AttachError(_format_problems(problems, "cannot attach the pathway"))
    for module, copies, shapes in targets:
        pathway = Pathway(
            copies if len(copies) > 1 else copies[0],
            aux_trainable=aux_trainable,
            init_scale=init_scale,
            scale_shapes=shapes,
        )
        pathway._param_order = tuple(module._parameters)
        # unsafe: skip the trial forward parametrize runs to check shape and dtype (W + λ·W_aux keeps both by
        # construction); that trial allocated a whole weight per linear, ~the model again in freed heap blocks
        if parametrize.is_parametrized(module):
            _own_class(module)  # its class may be shared with copies: keep `weight` off theirs
        parametrize.register_parametrization(module, "weight", pathway, unsafe=True)
        _own_class(module)
        pathway._handles = [
            module.register_state_dict_post_hook(_state_dict_post_hook),
            module.register_load_state_dict_pre_hook(_load_pre_hook),
            module.register_load_state_dict_post_hook(_load_post_hook),
        ]
    return model


def _aux_copies(
    weight: Tensor, auxes: Sequence[Tensor | _Stored], scale_shapes: list[tuple[int, ...]]
) -> list[Tensor] | str:
    """Each `W_aux` checked against `weight` and copied into a new tensor like it (the pathway's parameter), or the
    first problem."""
    copies: list[Tensor] = []
    for k, (aux, shape) in enumerate(zip(auxes, scale_shapes, strict=True)):
        copy = _aux_copy(weight, aux, shape, k)
        if isinstance(copy, str):
            return copy
        copies.append(copy)
    return copies


def _aux_copy(weight: Tensor, aux: Tensor | _Stored, scale_shape: tuple[int, ...], k: int) -> Tensor | str:
    """One `W_aux` checked and copied, or its problem. A stored one is read here (after the shape check), once; it
    is dropped on return, so a file's tensors are held one at a time."""
    if tuple(aux.shape) != tuple(weight.shape):
        return f"{aux_suffix(k)} shape {list(aux.shape)} != weight {list(weight.shape)}"
    values = _values(aux)
    if not (weight.is_floating_point() and values.is_floating_point()):
        return f"weight and {aux_suffix(k)} must be floating point"
    why = scale_problem(scale_shape, weight.shape)
    if why is not None:
        return f"{scale_suffix(k)} {why}"
    if not all_finite(values):
        return f"{aux_suffix(k)} has non-finite values"
    if values is not aux and _owned_like(values, weight):
        return values  # read into fresh memory of W's dtype: it becomes the parameter, no second copy
    return torch.empty_like(weight, requires_grad=False).copy_(values.detach())


def _owned_like(values: Tensor, weight: Tensor) -> bool:
    """Whether a tensor read for us (`_read`) can be W_aux's parameter as it is: a plain CPU tensor of W's dtype and
    shape, contiguous like a fresh `empty_like(W)`."""
    return (
        type(values) is Tensor
        and type(weight.data) is Tensor
        and values.dtype == weight.dtype
        and values.device == weight.device
        and values.shape == weight.shape
        and values.is_contiguous()
        and weight.is_contiguous()
    )


def _entries(model: nn.Module) -> list[tuple[str, nn.Module, Pathway]]:
    return [(name, m, pw) for name, m in model.named_modules() if (pw := _pathway_of(m)) is not None]


def pathway_modules(model: nn.Module) -> dict[str, Pathway]:
    """Module path → its `Pathway` parametrization, in module order."""
    return {name: pw for name, _m, pw in _entries(model)}


def scales(model: nn.Module, *, gather: bool = False) -> dict[str, LayerScales]:
    """Module path → current λ: a float for one auxiliary with one λ value (the paper's case), else one entry
    per auxiliary, each a float or the list of a finer λ's values (`paired_format.scale_entry`).

    Never a collective by default, so it is safe on any subset of ranks (`if rank == 0: log(scales(model))`).
    Under FSDP2 (`fully_shard`) λ is a DTensor sharded on dim 0: its one value lives on the first rank of the mesh
    and the others hold an empty shard, so a rank that holds no λ raises `BadInputError` rather than reading it
    from another rank (reading a sharded λ as a tensor all-gathers it: called on one rank only, that hangs until
    the process group's timeout). `gather=True` all-gathers every λ, so every rank gets them; it is a collective:
    call it on every rank of the mesh, in the same order as the other collectives.
    """
    values: dict[str, LayerScales] = {}
    elsewhere: list[str] = []
    for name, _m, pw in _entries(model):
        per_aux = [_scale_value(s.detach(), gather) for s in pw.scales]
        if any(v is None for v in per_aux):
            elsewhere.append(name)
        else:
            values[name] = scale_entry([v for v in per_aux if v is not None])
    if elsewhere:
        raise BadInputError(
            f"λ of {len(elsewhere)} layer(s) (e.g. '{elsewhere[0]}') is sharded onto another rank (FSDP2 keeps it on "
            "the first rank of the mesh): call scales(model) there, or scales(model, gather=True) on every rank"
        )
    return values


def _scale_value(scale: Tensor, gather: bool) -> list[float] | None:
    """λ's values: a plain tensor's; a DTensor's from this rank's shard where that shard is the whole (replicated,
    or sharded with this rank holding every element), all-gathered if `gather`; otherwise None."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(scale, dtensor):
        return scale.reshape(-1).tolist()
    if gather:
        return scale.full_tensor().reshape(-1).tolist()
    local = scale.to_local()
    whole = all(p.is_replicate() or p.is_shard() for p in scale.placements) and local.shape == scale.shape
    return local.reshape(-1).tolist() if whole else None


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_attached(model: nn.Module) -> bool:
    return bool(_entries(model))


def fold(model: nn.Module) -> nn.Module:
    """Fold every pathway into its weight (`W ← W + λ·W_aux` via `fold_weight`), in place; returns `model`.

    The result is a plain model: same classes, parameters and state-dict keys as before attaching. Every
    folded weight is computed and checked (finite λ and result) before any module changes, so a `FoldError`
    leaves the model as it was; this needs one extra copy of the pathway weights at peak. A model without
    pathway is returned unchanged (folding is idempotent). The `weight` Parameter objects are kept.

    Pathway modules wrapped by PEFT adapters are folded too (then PEFT's merge is correct). A pathway module whose
    adapter PEFT marked as merged (`merge_adapter()`) is refused: that merge went into a recomputed weight and was
    lost, and folding would make PEFT's later unmerge or merge act on the wrong weight.
    """
    lost = _lost_adapter_merges(model)
    if lost:
        raise FoldError(
            _format_problems(lost, "cannot fold: PEFT merged adapters into pathway weights, where a merge is lost")
            + "; call unmerge_adapter() on the PEFT model, then fold (mmsurgery.integrations.peft.merge_and_unload "
            "folds, then merges)"
        )
    entries = _entries(model)
    folded: list[Tensor] = []
    for name, module, pw in entries:
        plist = module.parametrizations["weight"]  # type: ignore[index]
        if len(plist) != 1:
            raise FoldError(f"'{name}': weight has {len(plist) - 1} other parametrization(s) on top of the pathway")
        folded.append(fold_weight(plist.original, pw.scales, pw.aux_weights, name=name))
    for (_name, module, pw), new_weight in zip(entries, folded, strict=True):
        for handle in pw._handles:
            handle.remove()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        if parametrize.is_parametrized(module):
            _own_class(module)  # other tensors stay parametrized: keep their class, without the pathway's names
        module.weight.data = new_weight
        params = module._parameters  # restore the original order (weight first) so keys match a plain model
        for key in [k for k in pw._param_order if k in params] + [k for k in params if k not in pw._param_order]:
            params[key] = params.pop(key)
    return model


def _lost_adapter_merges(model: nn.Module) -> list[str]:
    """Pathway modules that are the `base_layer` of a PEFT tuner layer listing `merged_adapters` (duck-typed:
    PEFT is never imported here)."""
    return [
        f"'{name}.base_layer': adapter(s) {', '.join(map(str, merged))} merged with PEFT's merge, which was lost"
        for name, module in model.named_modules()
        if (base := module._modules.get("base_layer")) is not None
        and _pathway_of(base) is not None
        and (merged := getattr(module, "merged_adapters", None))
    ]


def _no_decay_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "no_weight_decay", None)
    return set(getter()) if callable(getter) else set()


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    lr: float | None = None,
    scale_lr_mult: float | Sequence[float] = 1.0,
    decay_names: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups: ≥2-D weights (W_aux included) decayed; biases, norms, λ and the model's
    `no_weight_decay()` names (timm's convention) not decayed; the λ of each auxiliary alone in a group
    (`cross_modal_scale`, then `cross_modal_scale_1`, ... for further auxiliaries) with `lr_mult` = `scale_lr_mult`
    (one value, or one per auxiliary), and `lr` = `lr * lr_mult` when `lr` is given. `decay_names` replaces that
    rule with another's (Trainer's `get_decay_parameter_names`): exactly those parameters are decayed, λ never.
    Every trainable parameter appears exactly once; frozen ones (a frozen W_aux) and empty groups are left out.
    """
    modules = pathway_modules(model)
    num_aux = max((pw.num_aux for pw in modules.values()), default=1)
    mults = _per_aux(scale_lr_mult, num_aux, "scale_lr_mult")
    scale_index = {id(s): k for pw in modules.values() for k, s in enumerate(pw.scales)}
    skip = _no_decay_names(model)
    names = set(decay_names) if decay_names is not None else None
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    scale: list[list[nn.Parameter]] = [[] for _ in range(num_aux)]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in scale_index:
            scale[scale_index[id(param)]].append(param)
        elif (name not in names) if names is not None else (param.ndim <= 1 or name in skip):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        *(
            {"name": scale_suffix(k), "params": scale[k], "weight_decay": 0.0, "lr_mult": mults[k]}
            for k in range(num_aux)
        ),
    ]
    if lr is not None:
        for group in groups:
            group["lr"] = lr * group["lr_mult"]
    return [g for g in groups if g["params"]]
