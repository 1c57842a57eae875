"""`open_checkpoint`: one lazy view over every checkpoint format mmsurgery reads.

A `Checkpoint` knows every tensor's name, dtype and shape up front and reads a tensor only when asked. For
safetensors (single or sharded) that means the header only; torch is imported on the first `get`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.dtypes import FLOATING, torch_dtype_name
from mmsurgery.checkpoint.normalize import strip_prefixes, unwrap
from mmsurgery.checkpoint.pickled import load_pickle
from mmsurgery.checkpoint.safetensors_header import decode_floats, read_header
from mmsurgery.errors import BadInputError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Checkpoint:
    """A read-only, lazy name → tensor view of a checkpoint file or sharded set.

    Names are normalised: the wrapper was unwrapped (`unwrap_path`) and `module.` / `_orig_mod.` stripped.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        files: list[Path],
        infos: dict[str, TensorInfo],
        metadata: dict[str, str],
        loader: _Loader,
        unwrap_path: tuple[str, ...] = (),
        alternatives: tuple[str, ...] = (),
        ignored: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.format = fmt
        self.files = files
        self.infos = infos
        self.metadata = metadata
        self.unwrap_path = unwrap_path
        self.alternatives = alternatives
        self.ignored = ignored or {}
        self._loader = loader

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def keys(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def get(self, name: str) -> Any:
        """The tensor `name` (a torch.Tensor, possibly memory-mapped: never modify it in place)."""
        if name not in self.infos:
            raise KeyError(name)
        return self._loader.get(name)

    def read_floats(self, name: str) -> list[float]:
        """Values of a small floating-point tensor (λ), without importing torch for safetensors files."""
        if name not in self.infos:
            raise KeyError(name)
        return self._loader.read_floats(name)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Tensors one at a time, in file order, so a caller can stream a model without holding it whole."""
        for name in self.infos:
            yield name, self._loader.get(name)

    def to_state_dict(self) -> dict[str, Any]:
        return dict(self.items())

    @property
    def file_size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def num_params(self) -> int:
        """Elements of floating-point tensors (integer buffers such as `position_ids` are not parameters)."""
        return sum(i.numel for i in self.infos.values() if i.dtype in FLOATING)

    def close(self) -> None:
        self._loader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Loader:
    def get(self, name: str) -> Any:
        raise NotImplementedError

    def read_floats(self, name: str) -> list[float]:
        return [float(v) for v in self.get(name).float().reshape(-1).tolist()]

    def close(self) -> None:
        pass


class _SafetensorsLoader(_Loader):
    """Reads each tensor with `pread` into a fresh, owned buffer, at the offsets the validated header gives.

    Not memory-mapped on purpose: a streamed command's resident memory stays near the tensors it holds (mapped
    pages would count in RSS), and returned tensors are ordinary writable tensors (no copy-on-write traps).
    `source` maps a normalised name to (file, raw name).
    """

    def __init__(self, source: dict[str, tuple[Path, str]], headers: dict[Path, Any]) -> None:
        self._source = source
        self._headers = headers
        self._fds: dict[Path, int] = {}

    def _read(self, name: str) -> tuple[Any, Any, Path]:
        """(the file's header, the tensor's header entry, the file)."""
        file, raw = self._source[name]
        header = self._headers[file]
        return header, header.entries[raw], file

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def get(self, name: str) -> Any:
        import torch

        header, entry, file = self._read(name)
        n = entry.end - entry.begin
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            _pread_into(self._fd(file), memoryview(buf.numpy()), header.data_start + entry.begin, file)
        return buf.view(getattr(torch, entry.dtype)).reshape(entry.shape)

    def read_floats(self, name: str) -> list[float]:
        header, entry, file = self._read(name)
        raw = os.pread(self._fd(file), entry.end - entry.begin, header.data_start + entry.begin)
        return decode_floats(raw, entry.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_into(fd: int, view: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise BadInputError(f"{file}: truncated while reading (the file changed after its header was read?)")
        done += got


class _DictLoader(_Loader):
    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors

    def get(self, name: str) -> Any:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


def open_checkpoint(path: str | os.PathLike[str], key: str | None = None) -> Checkpoint:
    """Open a checkpoint: a `.safetensors` file, a sharded set (its index file or folder), a folder holding
    one model file, or a `.pt/.pth/.bin/.ckpt` pickle (see docs/formats.md for the precedence).

    `key` picks the wrapper entry of a pickle (`/` for nesting). Raises `BadInputError` on anything unreadable.
    """
    ck = _open(Path(path), key)
    if not len(ck):
        raise BadInputError(f"{ck.path}: an empty state dict (no tensors)")
    return ck


def _open(p: Path, key: str | None) -> Checkpoint:
    if not p.exists():
        raise BadInputError(f"{p}: no such file or folder")
    if p.is_dir():
        p = _weights_in_folder(p)
    if p.name.endswith(".index.json"):
        return _open_sharded(p, key)
    if p.suffix == ".safetensors":
        if key is not None:
            raise BadInputError("--key applies to pickled checkpoints; a safetensors file has no wrapper")
        return _open_safetensors(p)
    if p.suffix in PICKLE_SUFFIXES or _looks_like_pickle(p):
        return _open_pickle(p, key)
    raise BadInputError(f"{p}: unknown checkpoint format (expected .safetensors, .pt/.pth/.bin/.ckpt or an index)")


def _weights_in_folder(folder: Path) -> Path:
    for name in (*INDEX_NAMES, *SINGLE_NAMES):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) or sorted(f for s in PICKLE_SUFFIXES for f in folder.glob(f"*{s}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise BadInputError(f"{folder}: a folder without model weights (no .safetensors, .bin, .pt or index file)")
    names = ", ".join(f.name for f in found[:6])
    raise BadInputError(f"{folder}: several weight files ({names}); name the one to read")


def _looks_like_pickle(p: Path) -> bool:
    with p.open("rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _open_safetensors(p: Path) -> Checkpoint:
    header = read_header(p)
    names = list(header.entries)
    stripped = strip_prefixes({n: n for n in names})
    infos = {short: _info(short, header.entries[raw]) for short, raw in stripped.items()}
    source = {short: (p, raw) for short, raw in stripped.items()}
    return Checkpoint(p, "safetensors", [p], infos, header.metadata, _SafetensorsLoader(source, {p: header}))


def _info(name: str, entry: Any) -> TensorInfo:
    return TensorInfo(name, entry.dtype, entry.shape)


def _open_sharded(index: Path, key: str | None) -> Checkpoint:
    try:
        data = json.loads(index.read_text())
        weight_map: dict[str, str] = data["weight_map"]
        assert isinstance(weight_map, dict) and weight_map
    except Exception:
        raise BadInputError(f"{index}: not a valid shard index (needs a non-empty 'weight_map')") from None
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise BadInputError(f"{index}: shard file(s) missing: {', '.join(missing[:4])}")
    files = [index.parent / s for s in shards]
    if index.name.startswith("pytorch_model.bin"):
        merged: dict[str, Any] = {}
        for f in files:
            merged.update(unwrap(load_pickle(f), key).tensors)
        ck = _from_tensors(index, "torch-pickle-sharded", files, merged, (), (), {})
        return ck
    infos: dict[str, TensorInfo] = {}
    source: dict[str, tuple[Path, str]] = {}
    metadata: dict[str, str] = {}
    headers = {}
    for f in files:
        header = headers[f] = read_header(f)
        metadata.update(header.metadata)
        for raw, entry in header.entries.items():
            if weight_map.get(raw) != f.name:
                continue
            infos[raw] = _info(raw, entry)
            source[raw] = (f, raw)
    lost = sorted(set(weight_map) - set(infos))
    if lost:
        raise BadInputError(f"{index}: {len(lost)} tensor(s) listed but not in their shard, e.g. {lost[0]!r}")
    stripped = strip_prefixes({n: n for n in infos})
    infos = {short: TensorInfo(short, infos[raw].dtype, infos[raw].shape) for short, raw in stripped.items()}
    source = {short: source[raw] for short, raw in stripped.items()}
    return Checkpoint(index, "safetensors-sharded", files, infos, metadata, _SafetensorsLoader(source, headers))


def _open_pickle(p: Path, key: str | None) -> Checkpoint:
    u = unwrap(load_pickle(p), key)
    return _from_tensors(p, "torch-pickle", [p], u.tensors, u.path, u.alternatives, u.ignored)


def _from_tensors(
    p: Path,
    fmt: str,
    files: list[Path],
    tensors: dict[str, Any],
    path: tuple[str, ...],
    alternatives: tuple[str, ...],
    ignored: dict[str, str],
) -> Checkpoint:
    tensors = strip_prefixes(tensors)
    infos = {n: TensorInfo(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    return Checkpoint(p, fmt, files, infos, {}, _DictLoader(tensors), path, alternatives, ignored)
