"""`open_checkpoint`: one lazy view over every checkpoint format mmsurgery reads.

A `Checkpoint` knows every tensor's name, dtype and shape up front and reads a tensor only when asked. For
safetensors (single or sharded) that means the header only; torch is imported on the first `get`. Each
safetensors file is held open from `open_checkpoint` to `close`, so a Checkpoint reads the file it described even
if the path is replaced meanwhile (see `pins.Pins`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from mmsurgery.checkpoint import dcp
from mmsurgery.checkpoint.dtypes import torch_dtype_name
from mmsurgery.checkpoint.loaded import Checkpoint, Loader, PinnedLoader, TensorInfo, naming
from mmsurgery.checkpoint.normalize import strip_prefixes, unwrap
from mmsurgery.checkpoint.pins import Pins, check_regular, os_error, pread_into
from mmsurgery.checkpoint.safetensors_header import MAX_TENSORS, decode_floats
from mmsurgery.errors import BadInputError

__all__ = [
    "INDEX_NAMES",
    "MAX_INDEX_BYTES",
    "PICKLE_SUFFIXES",
    "SINGLE_NAMES",
    "Checkpoint",
    "TensorInfo",
    "open_checkpoint",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
MAX_INDEX_BYTES = 100_000_000  # a shard index is kilobytes; this only bounds what a damaged one can cost


class _SafetensorsLoader(PinnedLoader):
    """Reads each tensor with `pread` into a fresh, owned buffer, at the offsets the validated header gives.

    Not memory-mapped on purpose: a streamed command's resident memory stays near the tensors it holds (mapped
    pages would count in RSS), and returned tensors are ordinary writable tensors (no copy-on-write traps).
    `source` maps a normalised name to (file, raw name); `pins` holds the descriptor each header was read through.
    """

    def __init__(self, source: dict[str, tuple[Path, str]], headers: dict[Path, Any], pins: Pins) -> None:
        self._source = source
        self._headers = headers
        self._pins = pins

    def _read(self, name: str) -> tuple[Any, Any, Path]:
        """(the file's header, the tensor's header entry, the file)."""
        file, raw = self._source[name]
        header = self._headers[file]
        return header, header.entries[raw], file

    def get(self, name: str) -> Any:
        import torch

        _header, entry, _file = self._read(name)
        return self.read_into(name, torch.empty(entry.end - entry.begin, dtype=torch.uint8))

    def read_into(self, name: str, buf: Any) -> Any:
        import torch

        header, entry, file = self._read(name)
        n = entry.end - entry.begin
        if n:
            pin = self._pins.check(file)
            pread_into(pin.fd, memoryview(buf.numpy()), header.data_start + entry.begin, file)
            self._pins.check(file)  # a write during the read changed the mtime: these bytes may be torn
        return buf.view(getattr(torch, entry.dtype)).reshape(entry.shape)

    def read_floats(self, name: str) -> list[float]:
        header, entry, file = self._read(name)
        pin = self._pins.check(file)
        raw = os.pread(pin.fd, entry.end - entry.begin, header.data_start + entry.begin)
        self._pins.check(file)
        if len(raw) != entry.end - entry.begin:
            raise BadInputError(f"{file}: changed while being read (truncated after its header was read)")
        try:
            return decode_floats(raw, entry.dtype)
        except BadInputError as e:
            raise BadInputError(f"{file}: tensor {name!r}: {e}") from None


class _DictLoader(Loader):
    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors

    def get(self, name: str) -> Any:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


def open_checkpoint(path: str | os.PathLike[str], key: str | None = None) -> Checkpoint:
    """Open a checkpoint: a `.safetensors` file, a sharded set (its index file or folder), a folder holding
    one model file, a `.pt/.pth/.bin/.ckpt` pickle, or a `torch.distributed.checkpoint` folder (`checkpoint.dcp`;
    see docs/formats.md for the precedence).

    `key` picks the wrapper entry of a pickle or DCP folder (`/` for nesting). Raises `BadInputError` on anything
    unreadable.
    """
    p = Path(path)
    if "\x00" in str(p):  # os functions raise ValueError on it: no file can have that name
        raise BadInputError(f"{_brief(str(p))}: no such file or folder (a NUL character in the name)")
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
    return ck.path.parent if ck.path.name.endswith(".index.json") else None


def _open(p: Path, key: str | None) -> Checkpoint:
    if not p.exists():
        raise BadInputError(f"{p}: no such file or folder")
    if p.is_dir() or p.name == ".metadata":  # a torch.distributed.checkpoint folder, or its metadata file
        folder = p if p.is_dir() else p.parent
        if dcp.is_dcp_folder(folder):
            return dcp.open_dcp(folder, key)
    if p.is_dir():
        p = _weights_in_folder(p)
    check_regular(p)  # before anything opens it: a FIFO would block the open, a device may act on it
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
        if _present(folder / name):  # a FIFO or socket by that name is named in the refusal, not passed over
            return folder / name
    found = sorted(folder.glob("*.safetensors")) or sorted(f for s in PICKLE_SUFFIXES for f in folder.glob(f"*{s}"))
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


def _looks_like_pickle(p: Path) -> bool:
    with p.open("rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _open_safetensors(p: Path) -> Checkpoint:
    pins = Pins()
    try:
        header = pins.open(p)
        names = list(header.entries)
        stripped = naming(p, strip_prefixes, {n: n for n in names})
        infos = {short: _info(short, header.entries[raw]) for short, raw in stripped.items()}
        source = {short: (p, raw) for short, raw in stripped.items()}
        loader = _SafetensorsLoader(source, {p: header}, pins)
    except BaseException:
        pins.close()
        raise
    return Checkpoint(p, "safetensors", [p], infos, header.metadata, loader)


def _info(name: str, entry: Any) -> TensorInfo:
    return TensorInfo(name, entry.dtype, entry.shape)


def _open_sharded(index: Path, key: str | None) -> Checkpoint:
    weight_map = _read_weight_map(index)
    files = list(dict.fromkeys(index.parent / s for s in weight_map.values()))
    missing = [str(f.relative_to(index.parent)) for f in files if not os.path.exists(f)]  # else opened: checked
    if missing:
        raise BadInputError(f"{index}: shard file(s) missing: {', '.join(map(_brief, missing[:4]))}")
    if index.name.startswith("pytorch_model.bin"):
        merged: dict[str, Any] = {}
        contents: dict[Path, list[str]] = {}
        for f in files:
            tensors = naming(f, unwrap, _load_pickle(f), key).tensors
            contents[f] = list(tensors)
            merged.update(tensors)
        _check_shards(index, weight_map, contents)
        return _from_tensors(index, "torch-pickle-sharded", files, merged, (), (), {})
    pins = Pins()  # one descriptor per shard, held until close
    try:
        headers = {f: pins.open(f) for f in files}
        _check_shards(index, weight_map, {f: list(h.entries) for f, h in headers.items()})
        metadata: dict[str, str] = {}
        for header in headers.values():
            metadata.update(header.metadata)
        source = {raw: (f, raw) for f, header in headers.items() for raw in header.entries}  # file order
        stripped = naming(index, strip_prefixes, {n: n for n in source})
        infos = {short: _info(short, headers[source[raw][0]].entries[raw]) for short, raw in stripped.items()}
        source = {short: source[raw] for short, raw in stripped.items()}
        loader = _SafetensorsLoader(source, headers, pins)
    except BaseException:
        pins.close()
        raise
    return Checkpoint(index, "safetensors-sharded", files, infos, metadata, loader)


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's `weight_map` (tensor name -> shard file), checked: each shard a relative path that stays
    inside the index's folder, as Hugging Face writes them. Absolute paths and `..` are refused, not followed."""
    where = f"{index}: not a valid shard index"
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise BadInputError(f"{where} (larger than {MAX_INDEX_BYTES // 10**6} MB)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise BadInputError(f"{where} (JSON nested too deeply)") from None
    except _DuplicateKey as e:
        raise BadInputError(
            f"{where} (key {_brief(e.key)} appears twice in one object; JSON readers disagree on which one counts)"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"{where} (not JSON: {str(e)[:200]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{where} (needs a non-empty 'weight_map' object)")
    if len(weight_map) > MAX_TENSORS:
        raise BadInputError(
            f"{where} (weight_map lists {len(weight_map):,} tensors, more than the {MAX_TENSORS:,} "
            "a checkpoint may hold)"
        )
    for name, shard in weight_map.items():
        entry = f"{index}: weight_map entry {_brief(name)}"
        if not isinstance(shard, str):
            raise BadInputError(f"{entry} is {type(shard).__name__ if shard is not None else 'null'}, not a file name")
        parts = PurePosixPath(shard).parts
        if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\x00" in shard:
            raise BadInputError(f"{entry} = {_brief(shard)} points outside the index's folder; shards must lie in it")
    return weight_map


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct: `json.loads` would keep the last of two and drop the first."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_shards(index: Path, weight_map: dict[str, str], contents: dict[Path, list[str]]) -> None:
    """Every tensor of every shard is listed in `weight_map` under that shard, and every listed tensor is in its
    shard: a tensor the index does not name is an error, never silently dropped."""
    for f, names in contents.items():
        for name in names:
            listed = weight_map.get(name)
            if listed is None:
                raise BadInputError(
                    f"{index}: tensor {_brief(name)} is in {_brief(f.name)} but not in the index's weight_map"
                )
            if index.parent / listed != f:
                raise BadInputError(
                    f"{index}: tensor {_brief(name)} is in {_brief(f.name)} but weight_map puts it in {_brief(listed)}"
                )
    held = {name for names in contents.values() for name in names}
    lost = [n for n in weight_map if n not in held]
    if lost:
        raise BadInputError(
            f"{index}: {len(lost)} tensor(s) listed but not in their shard, e.g. {_brief(lost[0])} "
            f"(weight_map says {_brief(weight_map[lost[0]])})"
        )


def _brief(text: str, limit: int = 80) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def _load_pickle(path: Path) -> Any:
    """`pickled.load_pickle`, imported when a pickle is opened: safetensors readers (`inspect`) never pay for it."""
    from mmsurgery.checkpoint.pickled import load_pickle

    return load_pickle(path)


def _open_pickle(p: Path, key: str | None) -> Checkpoint:
    u = naming(p, unwrap, _load_pickle(p), key)
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
    tensors = naming(p, strip_prefixes, tensors)
    infos = {n: TensorInfo(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    return Checkpoint(p, fmt, files, infos, {}, _DictLoader(tensors), path, alternatives, ignored)
