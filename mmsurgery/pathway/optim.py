"""Training with the pathway: the optimizer's parameter groups (`param_groups`) and λ's current values (`scales`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch import nn

from mmsurgery.errors import AttachError, BadInputError
from mmsurgery.paired_format import LayerScales, scale_entry, scale_suffix
from mmsurgery.pathway.attach import pathway_modules
from mmsurgery.pathway.sharding import local_values
from mmsurgery.per_aux import per_aux

__all__ = ["param_groups", "scales"]


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
    for name, pw in pathway_modules(model).items():
        per_scale = [local_values(s.detach(), gather) for s in pw.scales]
        if any(v is None for v in per_scale):
            elsewhere.append(name)
        else:
            values[name] = scale_entry([v for v in per_scale if v is not None])
    if elsewhere:
        raise BadInputError(
            f"λ of {len(elsewhere)} layer(s) (e.g. '{elsewhere[0]}') is sharded onto another rank (FSDP2 keeps it on "
            "the first rank of the mesh): call scales(model) there, or scales(model, gather=True) on every rank"
        )
    return values


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
    mults = per_aux(scale_lr_mult, num_aux, "scale_lr_mult", error=AttachError)
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
