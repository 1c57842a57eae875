"""The paired-checkpoint format's names, in one torch-free module that imports nothing of `pairing`.

A paired checkpoint holds every target tensor plus, per paired linear `P`, `P.aux_weight` (W_aux, in the
target's layout) and `P.cross_modal_scale` (λ, one value): M2PT's own names, and what `model.state_dict()` shows
with `mmsurgery.pathway` attached. Readers that only need to find and read the pathways (`describe`, `fold`,
`inspect` without torch) ask this module. docs/formats.md describes the format.
"""

from __future__ import annotations

import math

from mmsurgery.checkpoint.reader import Checkpoint
from mmsurgery.errors import FoldError

__all__ = [
    "AUX_SUFFIX",
    "FORMAT_KEY",
    "PAIRED_FORMAT",
    "PLAN_KEY",
    "SCALE_SHAPES",
    "SCALE_SUFFIX",
    "VERSION_KEY",
    "VIT_KEY",
    "pathway_layers",
    "read_scales",
]

AUX_SUFFIX = "aux_weight"  # M2PT's names: <linear>.aux_weight and <linear>.cross_modal_scale
SCALE_SUFFIX = "cross_modal_scale"
FORMAT_KEY = "mmsurgery.format"  # metadata: "paired/1" or "folded/1"
PLAN_KEY = "mmsurgery.plan"
VERSION_KEY = "mmsurgery.version"
VIT_KEY = "mmsurgery.vit"  # the built-in ViT's config (models.vit.METADATA_KEY)
PAIRED_FORMAT = "paired/1"
SCALE_SHAPES = ((1,), ())  # λ is one value: M2PT's `torch.zeros(1)`, or a 0-d tensor; [1, 1, 1] would broadcast W


def pathway_layers(ck: Checkpoint) -> list[str]:
    """Module paths that carry a pathway: `P.cross_modal_scale`, `P.aux_weight` and `P.weight` all present.
    Raises `FoldError` for a half-present or misshapen pathway."""
    layers = [k.removesuffix("." + SCALE_SUFFIX) for k in ck.infos if k.endswith("." + SCALE_SUFFIX)]
    aux = {k.removesuffix("." + AUX_SUFFIX) for k in ck.infos if k.endswith("." + AUX_SUFFIX)}
    problems = [f"{p}: no aux_weight" for p in layers if p not in aux]
    problems += [f"{p}: aux_weight without cross_modal_scale" for p in sorted(aux - set(layers))]
    for p in layers:
        w = ck.infos.get(f"{p}.weight")
        if w is None:
            problems.append(f"{p}: no weight")
        elif p in aux and ck.infos[f"{p}.{AUX_SUFFIX}"].shape != w.shape:
            problems.append(f"{p}: aux_weight {list(ck.infos[f'{p}.{AUX_SUFFIX}'].shape)} != weight {list(w.shape)}")
        elif ck.infos[f"{p}.{SCALE_SUFFIX}"].shape not in SCALE_SHAPES:
            shape = list(ck.infos[f"{p}.{SCALE_SUFFIX}"].shape)
            what = "must hold one value" if math.prod(shape) != 1 else "must have shape [1] or [] (reshape it)"
            problems.append(f"{p}: cross_modal_scale has shape {shape}; λ {what}")
    if problems:
        raise FoldError(f"{ck.path}: not a consistent paired checkpoint: {'; '.join(problems[:4])}")
    return layers


def read_scales(ck: Checkpoint, layers: list[str]) -> dict[str, float]:
    """λ of each pathway layer (read without torch from a safetensors file)."""
    return {p: ck.read_floats(f"{p}.{SCALE_SUFFIX}")[0] for p in layers}
