"""The architectures `verify --arch` names, in one table: `vit` (the built-in ViT), `hf` (a Hugging Face model from
its `config.json`; transformers imported only when chosen), and any `package.module:factory`.

A new built-in architecture is one `Arch` subclass and one entry in `ARCHITECTURES`. This module sits above
`arch` and `hf_arch`, which import only `arch`'s base class: no import runs back up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from mmsurgery.errors import BadInputError
from mmsurgery.verify.arch import Arch, VitArch, factory_arch

__all__ = ["ARCHITECTURES", "load_arch"]

Checkpoints = Sequence[str | os.PathLike[str] | None]


def _vit(num_heads: int | None, checkpoints: Checkpoints) -> Arch:
    return VitArch(num_heads)


def _hf(num_heads: int | None, checkpoints: Checkpoints) -> Arch:
    from mmsurgery.verify.hf_arch import HfArch, find_config

    config = find_config(checkpoints)  # before importing transformers: a missing config is a quick exit 2
    return HfArch(config)


# name -> (builder(num_heads, checkpoints), whether it takes --heads)
ARCHITECTURES: dict[str, tuple[Callable[[int | None, Checkpoints], Arch], bool]] = {
    "vit": (_vit, True),
    "hf": (_hf, False),
}


def load_arch(spec: str, num_heads: int | None = None, *, checkpoints: Checkpoints = ()) -> Arch:
    """`"vit"` → the built-in ViT; `"hf"` → the Hugging Face model of the `config.json` in the folder of the first of
    `checkpoints` (PLAIN, then PAIRED) that has one; `"package.module:factory"` (attribute path allowed after the
    colon) → that factory. Anything else, or a factory that cannot be imported, raises `BadInputError`."""
    builder, takes_heads = ARCHITECTURES.get(spec, (None, False))
    if num_heads is not None and not takes_heads:
        raise BadInputError(f"--heads applies to the built-in --arch vit only; --arch {spec} knows its own head count")
    if builder is not None:
        return builder(num_heads, checkpoints)
    return factory_arch(spec)
