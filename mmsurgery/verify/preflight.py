"""Checks of a verify run's inputs against each other, before anything is built: PLAIN and PAIRED the wrong way
round, the built-in ViT asked to build a Hugging Face folder, and a configuration the architecture would have to
guess (reported; refused where a graph of it would be kept). Each failure is one `BadInputError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.errors import BadInputError
from mmsurgery.hf import CONFIG_NAME
from mmsurgery.layout.timm_vit import timm_vit_fields
from mmsurgery.paired_format import PairedCheckpoint, is_pathway_key
from mmsurgery.verify.arch import Arch, VitArch
from mmsurgery.verify.context import meta_state

__all__ = ["check_arch", "check_order"]


def check_order(plain: Checkpoint, paired: PairedCheckpoint, plain_arg: Path, paired_arg: Path) -> None:
    """PLAIN with pathway tensors and PAIRED without any: the two were given the wrong way round."""
    if not paired.is_plain:
        return
    leftover = next((k for k in plain.infos if is_pathway_key(k)), None)
    if leftover is not None:
        raise BadInputError(
            f"PLAIN and PAIRED look swapped: {plain_arg} holds pathway tensors (e.g. {leftover}) and {paired_arg} "
            f"holds none; give the folded checkpoint first: mmsurgery verify {paired_arg} --against {plain_arg}"
        )


def _check_builtin_vit(arch: Arch, plain: Checkpoint, paired: PairedCheckpoint | None, given: Path) -> None:
    """The built-in ViT (the default `--arch`) asked to build a checkpoint that is not timm-named, beside a
    Hugging Face `config.json`: say to pass `--arch hf` instead of failing on the missing timm keys."""
    if not isinstance(arch, VitArch):
        return
    try:
        timm_vit_fields({k: i.shape for k, i in plain.infos.items()})
    except BadInputError:
        for ck in (plain, paired.ck if paired is not None else None):
            folder = None if ck is None else (ck.path if ck.path.is_dir() else ck.path.parent)
            if folder is not None and (folder / CONFIG_NAME).is_file():
                raise BadInputError(
                    f"{given}: not the built-in timm-named ViT (--arch vit, the default) but a Hugging Face "
                    f"model ({folder / CONFIG_NAME}): pass --arch hf to build it from its config.json"
                ) from None


def check_arch(
    arch: Arch,
    plain: Checkpoint,
    paired: PairedCheckpoint | None,
    chosen: tuple[str, ...],
    onnx: Path | bool | None,
    given: Path,
) -> dict[str, Any]:
    """What the architecture guesses of the model's configuration (name → value; empty when nothing, or when no
    chosen stage builds a model), after refusing a built-in ViT for a Hugging Face folder and the export of a graph
    that would be kept (`--onnx FILE` not there yet) of a guessed configuration."""
    if not any(s != "weights" for s in chosen):
        return {}
    _check_builtin_vit(arch, plain, paired, given)
    inferred = _config_inferred(arch, plain, paired)
    if inferred and "onnx" in chosen and isinstance(onnx, Path) and not onnx.exists():
        guessed = ", ".join(f"{k} {v}" for k, v in inferred.items())
        raise BadInputError(
            f"--onnx {onnx}: the model's configuration is inferred, not recorded ({guessed}: the head-dim-64 rule; "
            "neither --heads nor the mmsurgery.vit metadata confirms it), so the kept graph may not be the trained "
            "model; pass --heads N to confirm the head count (or --onnx alone to check without keeping the graph)"
        )
    return inferred


def _config_inferred(arch: Arch, plain: Checkpoint, paired: PairedCheckpoint | None) -> dict[str, Any]:
    """The configuration fields the architecture guesses for PLAIN (and PAIRED), name → guessed value."""
    found: dict[str, Any] = {}
    for ck in (paired.ck if paired is not None else None, plain):
        if ck is not None:
            state = meta_state({k: i for k, i in ck.infos.items() if not is_pathway_key(k)})
            found |= arch.config_inferred(state, ck.metadata)
    return found
