"""Options given per auxiliary model: one value for every auxiliary, or one value per auxiliary.

`pairing.pair` (`depth`, `map_file`, `aux_stack`, `aux_key`) and the pathway (`aux_trainable`, `init_scale`,
`scale_lr_mult`) take their per-auxiliary options by this one rule.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from mmsurgery.errors import BadInputError

__all__ = ["per_aux"]


def per_aux(
    value: Any, n: int, what: str, *, error: type[BadInputError] = BadInputError, lone_list_for_all: bool = False
) -> list[Any]:
    """`value` once for each of `n` auxiliary models.

    A single value serves every auxiliary: anything `list()` does not take apart (a number, a bool, None), and a
    string, path or mapping (one `--map` file, one map). Any other iterable (a list, a tuple) gives one value per
    auxiliary and must have `n` of them, else `error` names the option (`what`) in one line. With
    `lone_list_for_all` a list of one value serves every auxiliary too: `pair`'s options, which the CLI gives as the
    list of a repeatable option (`pair T A1 A2 --depth first`); the pathway's options refuse it (`aux_trainable`
    takes `True` or one value per auxiliary, not `[True]` for two).
    """
    if isinstance(value, (str, bytes, os.PathLike, Mapping)) or not isinstance(value, Iterable):
        return [value] * n
    values = list(value)
    if lone_list_for_all and len(values) == 1:
        return values * n
    if len(values) != n:
        raise error(f"{what}: {len(values)} value(s) for {n} auxiliary model(s); give one, or one per model")
    return values
