"""`open_checkpoint`: one lazy view over every checkpoint format mmsurgery reads.

A `Checkpoint` knows every tensor's name, dtype and shape up front and reads a tensor only when asked. For
safetensors (single or sharded) that means the header only; torch is imported on the first `get`. Each
safetensors file is held open from `open_checkpoint` to `close`, so a Checkpoint reads the file it described even
if the path is replaced meanwhile (see `pins.Pins`). The formats themselves live in `checkpoint/formats/`, one
module each; `open_checkpoint` walks their table, `formats.FORMATS`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmsurgery.checkpoint.formats import FORMATS
from mmsurgery.checkpoint.formats.folder import weights_file
from mmsurgery.checkpoint.formats.sharded import INDEX_SUFFIX
from mmsurgery.checkpoint.loaded import Checkpoint, TensorInfo, brief
from mmsurgery.checkpoint.pins import check_regular, os_error
from mmsurgery.errors import BadInputError

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]


def open_checkpoint(path: str | os.PathLike[str], key: str | None = None) -> Checkpoint:
    """Open a checkpoint: a `.safetensors` file, a sharded set (its index file or folder), a folder holding
    one model file, a `.pt/.pth/.bin/.ckpt` pickle, or a `torch.distributed.checkpoint` folder
    (`formats.dcp_folder`; see docs/formats.md for the precedence).

    `key` picks the wrapper entry of a pickle or DCP folder (`/` for nesting). Raises `BadInputError` on anything
    unreadable.
    """
    p = Path(path)
    if "\x00" in str(p):  # os functions raise ValueError on it: no file can have that name
        raise BadInputError(f"{brief(str(p))}: no such file or folder (a NUL character in the name)")
    try:
        ck = _open(p, key)
    except OSError as e:  # a name too long to exist, a folder or file that may not be read
        raise os_error(Path(e.filename) if isinstance(e.filename, str) else p, e) from None
    if not len(ck):
        ck.close()
        raise BadInputError(f"{ck.path}: an empty state dict (no tensors)")
    ck.folder = _occupied_folder(p, ck)
    return ck


def _occupied_folder(given: Path, ck: Checkpoint) -> Path | None:
    """The folder an input occupies (`Checkpoint.folder`): `given` when it is a folder, a DCP checkpoint's folder
    (also when given as its `.metadata`), or the folder of a sharded set's index."""
    if given.is_dir():
        return given
    if ck.path.is_dir():
        return ck.path
    return ck.path.parent if ck.path.name.endswith(INDEX_SUFFIX) else None


def _open(p: Path, key: str | None) -> Checkpoint:
    """The first format of `FORMATS` that claims `p` opens it. A folder format is asked about `p` as given; the
    others about a regular file: when the walk reaches the first of them, a folder is replaced by the one weights
    file in it, and the file is checked to be a regular one before any format looks at it (reading a FIFO's magic
    bytes would block, and opening a device may act on it)."""
    if not p.exists():
        raise BadInputError(f"{p}: no such file or folder")
    file: Path | None = None
    for fmt in FORMATS:
        if fmt.folder:
            if fmt.claims(p):
                return fmt.open(p, key)
            continue
        if file is None:
            file = weights_file(p) if p.is_dir() else p
            check_regular(file)
        if fmt.claims(file):
            return fmt.open(file, key)
    raise BadInputError(
        f"{file or p}: unknown checkpoint format (expected .safetensors, .pt/.pth/.bin/.ckpt or an index)"
    )
