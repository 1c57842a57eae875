"""Attach a pathway to the modules a paired checkpoint names, find the attached ones, fold them back.

A paired file or `PairedCheckpoint` is the contract's to validate (`paired_format.open_paired` / `find_pathways`);
a state dict's pathway keys are checked by the contract's rules for complete pathways (`numbering_problem`,
`missing_key`). What only a live model can tell (the module exists, has a `weight` Parameter without
parametrization, W_aux matches it) is checked here, before the first module changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mmsurgery.checkpoint.dtypes import ITEMSIZE
from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.errors import AttachError, BadInputError, FoldError
from mmsurgery.foldmath import all_finite, fold_weight
from mmsurgery.hf import to_model_names
from mmsurgery.paired_format import (
    AUX_SUFFIX,
    SCALE_SUFFIX,
    PairedCheckpoint,
    aux_suffix,
    group_pathway_keys,
    missing_key,
    numbering_problem,
    open_paired,
    scale_problem,
    scale_suffix,
    split_paired,
)
from mmsurgery.pathway.parametrization import Pathway, pathway_of
from mmsurgery.pathway.state_names import own_class, register_state_hooks
from mmsurgery.per_aux import per_aux

__all__ = ["attach", "fold", "is_attached", "pathway_modules"]

_MAX_LISTED = 8


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
            per_aux(what, num_aux, label, error=AttachError)
        except AttachError as e:
            problems.append(str(e))
    paths: list[str] = []
    for path, keys in found.items():  # complete by the contract's rules (a PairedCheckpoint's always are)
        indices = sorted(keys)
        if (why := numbering_problem(indices)) is not None:
            problems.append(f"'{path}': {why}")
        elif len(indices) != num_aux:
            problems.append(f"'{path}': {len(indices)} auxiliary model(s), other layers have {num_aux}")
        else:
            missing = [why for k in indices if (why := missing_key(k, keys[k])) is not None]
            problems += [f"'{path}': {why}" for why in missing]
            if not missing:
                paths.append(path)
    if layers is not None:
        wanted = list(dict.fromkeys(layers))
        absent = [p for p in wanted if p not in paths]
        problems += [f"'{p}': asked for in layers but not a pathway of the paired checkpoint" for p in absent]
        paths = [p for p in wanted if p in paths]
    if not paths and not problems:
        problems.append(f"no pathway keys (`P.{AUX_SUFFIX}` with `P.{SCALE_SUFFIX}`) in the paired checkpoint")
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
            kind = "a pathway" if pathway_of(module) is not None else "a parametrization"
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
            own_class(module)  # its class may be shared with copies: keep `weight` off theirs
        parametrize.register_parametrization(module, "weight", pathway, unsafe=True)
        own_class(module)
        pathway._handles = register_state_hooks(module)
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
    return [(name, m, pw) for name, m in model.named_modules() if (pw := pathway_of(m)) is not None]


def pathway_modules(model: nn.Module) -> dict[str, Pathway]:
    """Module path → its `Pathway` parametrization, in module order."""
    return {name: pw for name, _m, pw in _entries(model)}


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
            own_class(module)  # other tensors stay parametrized: keep their class, without the pathway's names
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
        and pathway_of(base) is not None
        and (merged := getattr(module, "merged_adapters", None))
    ]
