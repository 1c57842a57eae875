"""Reading a `torch.distributed.checkpoint` (DCP) folder directly, one tensor at a time.

`dcp.save` writes a folder holding `.metadata` and `__<rank>_<n>.distcp` files, each a concatenation of one
`torch.save` archive per chunk. `FORMAT` claims such a folder, or its `.metadata` named directly, before any other
format looks at the path (a folder format). `open_dcp` reads `.metadata` through `dcp_metadata.parse_metadata` (a
restricted unpickler, every field checked), checks that every stored entry lies inside its file, and reassembles a
tensor only when it is asked for, reading each chunk with `torch.load(weights_only=True)` through the pinned
descriptor of its file: memory stays near the tensor being assembled. Entries that are not tensors (pickled
objects) are listed but never read. See docs/formats.md, "DCP checkpoint folders".
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.dcp_metadata import METADATA_NAME, DcpChunk, DcpLayout, DcpTensor, parse_metadata
from mmsurgery.checkpoint.loaded import Checkpoint, Format, PinnedLoader, TensorInfo, brief, naming
from mmsurgery.checkpoint.normalize import strip_prefixes, unwrap
from mmsurgery.checkpoint.pins import Pin, Pins, check_regular, not_regular, os_error
from mmsurgery.errors import BadInputError

__all__ = ["DCP_FORMAT", "FORMAT", "SUFFIX", "is_dcp_folder", "open_dcp"]

DCP_FORMAT = "dcp"
SUFFIX = ".distcp"
MAX_METADATA_BYTES = 1 << 30  # metadata of very large runs is tens of MB; this only bounds what a damaged one costs
ZIP_MAGIC = b"PK\x03\x04"  # each chunk is a torch.save archive (SerializationFormat.TORCH_SAVE, the default)


def is_dcp_folder(folder: Path) -> bool:
    """Whether `folder` holds a DCP checkpoint: its `.metadata`, or `.distcp` files or per-rank `__<rank>.metadata`
    (then `open_dcp` says what is missing)."""
    return _present(folder / METADATA_NAME) or any(folder.glob(f"*{SUFFIX}")) or any(folder.glob(f"__*{METADATA_NAME}"))


def _present(path: Path) -> bool:
    """A file of any kind but a folder: whether it is a regular one is `pins.check_regular`'s to say, naming it,
    not a reason to call it missing."""
    return os.path.exists(path) and not os.path.isdir(path)


def open_dcp(folder: Path, key: str | None = None) -> Checkpoint:
    """Open the DCP checkpoint in `folder` as a lazy `Checkpoint` of its tensors.

    Names are the saved state dict's, unwrapped as a pickle's are (`key` picks an entry, `/` for nesting: `--key
    model` for `dcp.save({"model": ..., "optim": ...})`; otherwise the first of `normalize.UNWRAP_KEYS` holding
    tensors) and stripped of `module.` / `_orig_mod.`. Raises `BadInputError` for anything unreadable or unsafe.
    """
    meta = folder / METADATA_NAME
    per_rank = sorted(f.name for f in folder.glob(f"__*{METADATA_NAME}"))
    if not _present(meta) and per_rank:
        raise BadInputError(
            f"{folder}: per-rank metadata ({', '.join(per_rank[:3])}) from a save without collectives; mmsurgery "
            f"reads one {METADATA_NAME} (save with a process group, or load with torch and save again)"
        )
    if not _present(meta):
        raise BadInputError(
            f"{folder}: .distcp files without their {METADATA_NAME} (the save did not finish, or the file was lost)"
        )
    pins = _FilePins()
    try:
        layout = parse_metadata(meta, _read_metadata(pins, meta))
        for name in layout.files:
            if not os.path.exists(folder / name):  # anything there is opened, and refused unless a regular file
                raise BadInputError(f"{folder}: shard file {name!r} named in {METADATA_NAME} is missing")
            pins.open_file(folder / name)
        _check_extents(folder, layout, pins)
        names = _model_names(folder, layout, key)
        infos = {n: TensorInfo(n, layout.tensors[k].dtype, layout.tensors[k].shape) for n, k in names.tensors.items()}
        loader = _DcpLoader(folder, {n: layout.tensors[k] for n, k in names.tensors.items()}, pins)
    except BaseException:
        pins.close()
        raise
    files = [meta, *(folder / f for f in layout.files)]
    return Checkpoint(
        path=folder,
        fmt=DCP_FORMAT,
        files=files,
        infos=infos,
        metadata={},
        loader=loader,
        unwrap_path=names.path,
        alternatives=names.alternatives,
        ignored=names.ignored,
    )


def _read_metadata(pins: _FilePins, meta: Path) -> bytes:
    pin = pins.open_file(meta)
    if pin.size > MAX_METADATA_BYTES:
        raise BadInputError(f"{meta}: not a DCP metadata file (larger than {MAX_METADATA_BYTES >> 20} MiB)")
    return pins.read(meta, 0, pin.size)


def _check_extents(folder: Path, layout: DcpLayout, pins: _FilePins) -> None:
    """Every stored entry lies inside its file (an offset past the end is a damaged or truncated file), and each
    file starts with a `torch.save` archive (the default format; SAFETENSORS-format saves are refused by name)."""
    first: dict[str, int] = {}
    for key, file, offset, length in layout.extents:
        size = pins.size(folder / file) or 0
        if offset + length > size:
            raise BadInputError(
                f"{folder / file}: entry {brief(key)} at bytes {offset}..{offset + length} lies past the end of "
                f"the file ({size} bytes); the file is truncated or damaged"
            )
        first[file] = min(first.get(file, offset), offset)
    for name, offset in first.items():
        head = pins.read(folder / name, offset, 12)
        if head[:4] == ZIP_MAGIC:
            continue
        if offset == 0 and len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
            raise BadInputError(
                f"{folder / name}: saved with serialization_format=SAFETENSORS; mmsurgery reads DCP's default "
                "torch_save format (save again without serialization_format)"
            )
        raise BadInputError(f"{folder / name}: no torch.save archive at byte {offset}; the file is damaged")


@dataclass(frozen=True)
class _Names:
    tensors: dict[str, str]  # normalised name -> flattened DCP key
    path: tuple[str, ...]
    alternatives: tuple[str, ...]
    ignored: dict[str, str]


class _NotRead:
    """Stands for a non-tensor entry (a pickled object) in the nested view given to `unwrap`."""


_NotRead.__name__ = "object (not read)"


def _model_names(folder: Path, layout: DcpLayout, key: str | None) -> _Names:
    """Rebuild the saved state dict's nesting with stand-ins (meta tensors, costing nothing), unwrap it exactly as
    a pickle is unwrapped, strip wrapper prefixes; then map each name back to its DCP key."""
    import torch

    nested: dict[str, Any] = {}
    key_of: dict[int, str] = {}
    for k, path in layout.paths.items():
        t = layout.tensors.get(k)
        value: Any = _NotRead() if t is None else torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta")
        key_of[id(value)] = k
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BadInputError(f"{folder}: {METADATA_NAME}: {brief(k)} is nested under a tensor")
        if path[-1] in node:
            raise BadInputError(f"{folder}: {METADATA_NAME}: two entries at {brief('/'.join(path))}")
        node[path[-1]] = value
    u = naming(folder, unwrap, nested, key)
    tensors = naming(folder, strip_prefixes, u.tensors)
    return _Names({n: key_of[id(v)] for n, v in tensors.items()}, u.path, u.alternatives, u.ignored)


# --- pinned files and chunk reads -----------------------------------------------------------------------------


class _FilePins(Pins):
    """`pins.Pins` for files without a safetensors header: one descriptor per file, opened once, with the size
    and mtime at open checked before and after every read (a file replaced by rename is never seen)."""

    def open_file(self, path: Path) -> Pin:
        check_regular(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise os_error(path, e) from None
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise os_error(path, e) from None
        if not stat.S_ISREG(st.st_mode):  # replaced since `check_regular`
            os.close(fd)
            raise not_regular(path, st.st_mode)
        pin = Pin(fd, st.st_size, st.st_mtime_ns)
        self._pins[path] = pin
        return pin

    def read(self, path: Path, offset: int, length: int) -> bytes:
        pin = self.check(path)
        parts = []
        done = 0
        while done < length:
            got = os.pread(pin.fd, min(length - done, 1 << 24), offset + done)
            if not got:
                break
            parts.append(got)
            done += len(got)
        self.check(path)
        return b"".join(parts)


class _Slice(io.RawIOBase):
    """Bytes `offset .. offset + length` of a pinned file, as the seekable file `torch.load` reads a chunk from:
    the archive's records are read straight into their tensors, never held as bytes first."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = min(len(b), self._length - self._pos)
        if want <= 0:
            return 0
        with memoryview(b) as view, view.cast("B") as flat, flat[:want] as part:  # released before returning
            got = os.preadv(self._fd, [part], self._offset + self._pos)
        self._pos += got
        return got

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(base + pos, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos


class _DcpLoader(PinnedLoader):
    def __init__(self, folder: Path, tensors: dict[str, DcpTensor], pins: _FilePins) -> None:
        self._folder = folder
        self._tensors = tensors
        self._pins = pins

    def get(self, name: str) -> Any:
        """The tensor, assembled from its chunks; a tensor saved whole is returned as loaded."""
        import torch

        t = self._tensors[name]
        dtype = getattr(torch, t.dtype)
        if len(t.chunks) == 1 and t.chunks[0].sizes == t.shape:
            return self._chunk(t, t.chunks[0], dtype)
        out = torch.empty(t.shape, dtype=dtype)
        for c in t.chunks:
            part = self._chunk(t, c, dtype)
            out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))] = part
            del part
        return out

    def _chunk(self, t: DcpTensor, c: DcpChunk, dtype: Any) -> Any:
        import torch

        from mmsurgery.checkpoint.pickled import first_line

        file = self._folder / c.file
        pin = self._pins.check(file)
        where = f"{file}: chunk of {brief(t.key)} at byte {c.offset}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = torch.load(_Slice(pin.fd, c.offset, c.length), map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged archive, or a pickle weights_only refuses
            raise BadInputError(f"{where}: not a readable tensor ({first_line(e)})") from None
        self._pins.check(file)  # a write during the read: these bytes may be torn
        if not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor:
            raise BadInputError(f"{where}: holds a {type(value).__name__}, not a tensor")
        if value.dtype != dtype or tuple(value.shape) != c.sizes:
            raise BadInputError(
                f"{where}: holds {str(value.dtype).removeprefix('torch.')} {list(value.shape)}, "
                f"{METADATA_NAME} says {t.dtype} {list(c.sizes)}"
            )
        return value if value.is_contiguous() else value.contiguous()


def _folder(p: Path) -> Path:
    """The folder `p` stands for: itself, or the folder of its `.metadata`."""
    return p if p.is_dir() else p.parent


def _claims(p: Path) -> bool:
    return (p.is_dir() or p.name == METADATA_NAME) and is_dcp_folder(_folder(p))


def _open(p: Path, key: str | None) -> Checkpoint:
    return open_dcp(_folder(p), key)


FORMAT = Format(name=DCP_FORMAT, claims=_claims, open=_open, folder=True)
