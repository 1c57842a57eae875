"""A pickled checkpoint (`.pt/.pth/.bin/.ckpt/.pkl/.tar`, or a file that starts like one): loaded whole with
`torch.load(weights_only=True)` (`pickled.load_pickle`), unwrapped and stripped of wrapper prefixes.

`pickled` is imported when a pickle is opened, so safetensors readers (`inspect`) never pay for it.
`from_tensors` also builds the Checkpoint of a set of pickled shards (`formats.sharded`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.dtypes import torch_dtype_name
from mmsurgery.checkpoint.loaded import Checkpoint, Format, Loader, TensorInfo, naming
from mmsurgery.checkpoint.normalize import strip_prefixes, unwrap

__all__ = ["FORMAT", "PICKLE_SUFFIXES", "from_tensors", "looks_like_pickle", "open_pickle"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")


class _DictLoader(Loader):
    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors

    def get(self, name: str) -> Any:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


def looks_like_pickle(p: Path) -> bool:
    """Whether `p` starts as `torch.save` output does: a zip archive, or a pickle's PROTO opcode."""
    with p.open("rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _load_pickle(path: Path) -> Any:
    """`pickled.load_pickle`, imported when a pickle is opened: safetensors readers (`inspect`) never pay for it."""
    from mmsurgery.checkpoint.pickled import load_pickle

    return load_pickle(path)


def open_pickle(p: Path, key: str | None) -> Checkpoint:
    """The pickle `p` as a `Checkpoint` (held in memory); `key` picks the wrapper entry."""
    u = naming(p, unwrap, _load_pickle(p), key)
    return from_tensors(p, "torch-pickle", [p], u.tensors, u.path, u.alternatives, u.ignored)


def from_tensors(
    p: Path,
    fmt: str,
    files: list[Path],
    tensors: dict[str, Any],
    path: tuple[str, ...],
    alternatives: tuple[str, ...],
    ignored: dict[str, str],
) -> Checkpoint:
    """A `Checkpoint` of unwrapped, loaded `tensors`, their names stripped of `module.` / `_orig_mod.`."""
    tensors = naming(p, strip_prefixes, tensors)
    infos = {n: TensorInfo(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    return Checkpoint(
        path=p,
        fmt=fmt,
        files=files,
        infos=infos,
        metadata={},
        loader=_DictLoader(tensors),
        unwrap_path=path,
        alternatives=alternatives,
        ignored=ignored,
    )


def _claims(p: Path) -> bool:
    return p.suffix in PICKLE_SUFFIXES or looks_like_pickle(p)


FORMAT = Format(name="pickle", claims=_claims, open=open_pickle)
