"""Atomic safetensors writing: one file or Hugging Face shards with an index, streamed tensor by tensor.

The header is computed from the tensor specs up front, so a producer (the streaming fold) hands over one
tensor at a time and nothing bigger than one tensor is held. Every file is written to a temp file in the
target folder, fsynced, and renamed only when all of them are complete: no half-written output, ever.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.dtypes import ITEMSIZE, NAME_TO_CODE, torch_dtype_name
from mmsurgery.checkpoint.reader import TensorInfo
from mmsurgery.errors import BadInputError, OutputExistsError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """`"2GB"` → 2·10⁹ bytes, `"500MiB"` → 500·2²⁰ bytes, `"1048576"` → bytes (decimal units, as HF uses)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise BadInputError(f"size {text!r}: expected bytes such as 2GB, 500MB, 1GiB or 1048576")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(frozen=True)
class WriteResult:
    files: tuple[Path, ...]
    index: Path | None
    total_size: int  # bytes of tensor data, as the index's `total_size`

    @property
    def path(self) -> Path:
        """What to hand to `open_checkpoint` to read the output back."""
        return self.index or self.files[0]


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse to write over an input (always) or an existing file (unless `force`)."""
    for src in inputs:
        src = Path(src)
        same = src.resolve() == out.resolve() or (out.exists() and src.exists() and os.path.samefile(src, out))
        if same:
            raise OutputExistsError(f"{out}: the output would overwrite an input; choose another path")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")


class SafetensorsWriter:
    """Write tensors, in the order of `specs`, to `path` (`x.safetensors` or a folder), sharded if needed.

    Use as a context manager: `write()` each tensor, then `commit()`; leaving the block without `commit()`
    (an exception, an interrupt) removes every temp file and leaves the target untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorInfo],
        *,
        metadata: Mapping[str, str] | None = None,
        shard_size: int | str | None = None,
        force: bool = False,
        inputs: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        path = Path(path)
        folder, stem = (path, "model") if path.is_dir() or path.suffix != ".safetensors" else (path.parent, path.stem)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._original_metadata = dict(self.metadata)
        limit = parse_size(shard_size) if shard_size is not None else None
        groups = _plan_shards(specs, limit)
        n = len(groups)
        if n == 1:
            names, self.index = [f"{stem}.safetensors"], None
        else:
            names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            self.index = folder / f"{stem}.safetensors.index.json"
        self.targets = [folder / name for name in names]
        for t in [*self.targets, *([self.index] if self.index else [])]:
            check_output(t, [Path(i) for i in inputs], force)
        folder.mkdir(parents=True, exist_ok=True)
        self._groups = groups
        self._order = [s.name for g in groups for s in g]
        self._specs = {s.name: s for s in specs}
        self._pos = 0
        self._shard = -1
        self._file: Any = None
        self._temps: list[Path] = []
        self._committed = False

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._committed:
            self.abort()

    def write(self, name: str, tensor: Any) -> None:
        if self._pos >= len(self._order) or self._order[self._pos] != name:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing more"
            raise ValueError(f"tensors must come in spec order: got {name!r}, expected {expected!r}")
        spec = self._specs[name]
        if torch_dtype_name(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, header says {spec.dtype} {spec.shape}")
        shard = self._shard_of(self._pos)
        if shard != self._shard:
            self._open_shard(shard)
        self._file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(_uint8()).numpy()))
        self._pos += 1

    def commit(self, patch: Mapping[str, str] | None = None) -> WriteResult:
        """Rename every file into place. `patch` replaces placeholder strings in the metadata (each with a
        string of the same length, e.g. a digest computed while the tensors streamed) before anything is renamed."""
        if self._pos != len(self._order):
            raise ValueError(f"{len(self._order) - self._pos} tensor(s) were never written")
        self._close_file()
        if patch:
            self._patch_headers(patch)
        for temp, target in zip(self._temps, self.targets, strict=True):
            os.replace(temp, target)
        if self.index is not None:
            weight_map = {s.name: self.targets[i].name for i, g in enumerate(self._groups) for s in g}
            body = {"metadata": {"total_size": self.total_size, **self.metadata}, "weight_map": weight_map}
            write_text_atomic(self.index, json.dumps(body, indent=2) + "\n")
        _fsync_dir(self.targets[0].parent)
        self._committed = True
        return WriteResult(tuple(self.targets), self.index, self.total_size)

    def _patch_headers(self, patch: Mapping[str, str]) -> None:
        for old, new in patch.items():
            if len(old) != len(new):
                raise ValueError(f"a metadata patch must keep the length: {old!r} -> {new!r}")
        for k, v in self.metadata.items():
            for old, new in patch.items():
                v = v.replace(old, new)
            self.metadata[k] = v
        for shard, temp in enumerate(self._temps):
            header = _header(self._groups[shard], self.metadata)
            with open(temp, "r+b") as f:
                if len(header) != len(_header(self._groups[shard], self._original_metadata)):
                    raise ValueError("the patched header changed length")
                f.write(header)
                f.flush()
                os.fsync(f.fileno())

    def abort(self) -> None:
        self._close_file()
        for temp in self._temps:
            temp.unlink(missing_ok=True)
        self._temps = []

    @property
    def total_size(self) -> int:
        return sum(_nbytes(s) for s in self._specs.values())

    def _shard_of(self, pos: int) -> int:
        for i, g in enumerate(self._groups):
            if pos < len(g):
                return i
            pos -= len(g)
        raise IndexError(pos)

    def _open_shard(self, shard: int) -> None:
        self._close_file()
        target = self.targets[shard]
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        self._temps.append(Path(tmp))
        header = _header(self._groups[shard], self.metadata)
        try:  # reserve the extents up front: fewer block allocations while streaming, and ENOSPC before any data
            os.posix_fallocate(fd, 0, len(header) + sum(_nbytes(s) for s in self._groups[shard]))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: write as usual
                os.close(fd)
                raise
        self._file = os.fdopen(fd, "wb")
        self._file.write(header)
        self._shard = shard

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), 0o666 & ~_umask())
            self._file.close()
            self._file = None


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    metadata: Mapping[str, str] | None = None,
    shard_size: int | str | None = None,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> WriteResult:
    """Write a whole in-memory state dict atomically (see `SafetensorsWriter` for streaming)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    specs = [TensorInfo(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in items]
    with SafetensorsWriter(path, specs, metadata=metadata, shard_size=shard_size, force=force, inputs=inputs) as w:
        for name, t in items:
            w.write(name, t)
        return w.commit()


def _nbytes(spec: TensorInfo) -> int:
    return spec.numel * ITEMSIZE[spec.dtype]


def _plan_shards(specs: Sequence[TensorInfo], limit: int | None) -> list[list[TensorInfo]]:
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for s in specs:
        n = _nbytes(s)
        if limit is not None and groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += n
    return groups


def _header(specs: Sequence[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for s in specs:
        n = _nbytes(s)
        header[s.name] = {
            "dtype": NAME_TO_CODE[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to a temp file beside `path`, fsync, rename: a reader never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _uint8() -> Any:
    import torch

    return torch.uint8
