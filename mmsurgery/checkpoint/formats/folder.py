"""A folder given where a file format is expected (a Hugging Face model folder, or any folder of weights): the
one weights file in it, which the file formats then claim like a file named directly. Not a format of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmsurgery.checkpoint.formats.pickle_file import PICKLE_SUFFIXES
from mmsurgery.checkpoint.formats.safetensors_file import SUFFIX
from mmsurgery.errors import BadInputError

__all__ = ["INDEX_NAMES", "SINGLE_NAMES", "weights_file"]

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def weights_file(folder: Path) -> Path:
    """The file holding `folder`'s weights: the first of Hugging Face's names present (an index before a single
    file, safetensors before a pickle), else its only `.safetensors` file, else its only pickle. Raises
    `BadInputError` for a folder without weights, or with several and no name to choose by."""
    for name in (*INDEX_NAMES, *SINGLE_NAMES):
        if _present(folder / name):  # a FIFO or socket by that name is named in the refusal, not passed over
            return folder / name
    found = sorted(folder.glob(f"*{SUFFIX}")) or sorted(f for s in PICKLE_SUFFIXES for f in folder.glob(f"*{s}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise BadInputError(f"{folder}: a folder without model weights (no .safetensors, .bin, .pt or index file)")
    names = ", ".join(f.name for f in found[:6])
    raise BadInputError(f"{folder}: several weight files ({names}); name the one to read")


def _present(p: Path) -> bool:
    """Whether a file (of any kind but a folder) exists at `p`: whether it is a regular one is `check_regular`'s to
    say, in a message naming it, rather than a reader's to skip or call missing."""
    return os.path.exists(p) and not os.path.isdir(p)
