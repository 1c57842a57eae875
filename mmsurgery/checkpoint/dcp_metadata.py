"""The contract of a `torch.distributed.checkpoint` (DCP) `.metadata` file, read without trusting it.

`dcp.save` pickles a `Metadata`: for every entry of the saved state dict its global shape and dtype and the chunks
the ranks saved (`TensorStorageMetadata`), or `BytesStorageMetadata` for a pickled object; `storage_data` maps each
chunk (key, offsets) to its file, byte offset and length; `planner_data` records how a nested state dict was
flattened. `parse_metadata` reads it with a restricted unpickler that knows only DCP's metadata classes and builds
inert records from them (nothing of torch runs, `torch.distributed` is not imported, every other global is refused
by name), then checks every field and that the chunks of each tensor tile it exactly: the typed `DcpLayout` it
returns can be trusted by the reader (`checkpoint.formats.dcp_folder`). torch is imported only to name dtypes.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mmsurgery.errors import BadInputError, UnsafeCheckpointError

__all__ = [
    "METADATA_NAME",
    "RECORD_CLASSES",
    "DcpChunk",
    "DcpLayout",
    "DcpTensor",
    "parse_metadata",
    "unpickle_metadata",
]

METADATA_NAME = ".metadata"  # torch.distributed.checkpoint.filesystem._metadata_fn
_META = "torch.distributed.checkpoint.metadata"
_SHARDED = "torch.distributed._shard.sharded_tensor.metadata"  # where torch 2.0-2.1 kept TensorProperties
RECORD_CLASSES = (
    f"{_META}.Metadata",
    f"{_META}.TensorStorageMetadata",
    f"{_META}.BytesStorageMetadata",
    f"{_META}.ChunkStorageMetadata",
    f"{_META}.TensorProperties",
    f"{_META}.MetadataIndex",
    f"{_META}.StorageMeta",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    f"{_SHARDED}.TensorProperties",
)
"""DCP's metadata classes: the only classes the restricted unpickler builds (as inert records)."""


@dataclass(frozen=True)
class DcpChunk:
    """One saved piece of a tensor: its box in the global tensor and where its `torch.save` archive lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative to the folder; a plain file name
    offset: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class DcpTensor:
    key: str  # DCP's flattened key, e.g. `model.blocks.0.attn.qkv.weight`
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]  # the non-empty chunks, which tile the tensor exactly


Extent = tuple[str, str, int, int]  # (key, file, byte offset, length)


@dataclass(frozen=True)
class DcpLayout:
    """What `.metadata` says, checked: tensors by flattened key, the nesting of every key in the saved state dict
    (`planner_data`), the keys of non-tensor entries, the files referenced, and DCP's version string."""

    tensors: dict[str, DcpTensor]
    paths: dict[str, tuple[str, ...]]
    objects: tuple[str, ...]
    files: tuple[str, ...]
    extents: tuple[Extent, ...]  # every stored entry, tensor chunk or object
    version: str | None


class _Record:
    """Stands for an instance of one of DCP's metadata classes: keeps its constructor arguments and pickled state,
    runs nothing. `kind` is the class's qualified name."""

    kind = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Record:
        self = super().__new__(cls)
        self.args = args
        self.state = dict(kwargs) if kwargs else None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def fields(self) -> dict[str, Any]:
        """The instance's attributes (a dataclass pickles its `__dict__`; `(dict, slots)` pairs are merged)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            return {**(state[0] or {}), **(state[1] or {})}
        return dict(state) if isinstance(state, dict) else {}


_RECORDS = {name: type(name.rsplit(".", 1)[1], (_Record,), {"kind": name.rsplit(".", 1)[1]}) for name in RECORD_CLASSES}


def _size(dims: Any = ()) -> tuple[int, ...]:
    """torch.Size pickles as `torch.Size((d0, d1, ...))`; read back as a tuple of ints."""
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise pickle.UnpicklingError("torch.Size of something other than integers")
    return tuple(dims)


def _layout(name: Any) -> str:
    return str(name)


def _mem_format(value: Any) -> int:
    return int(value)


def _path(*parts: Any) -> str:
    return str(PurePosixPath(*(str(p) for p in parts)))


def _windows_path(*parts: Any) -> str:
    return str(PureWindowsPath(*(str(p) for p in parts)))


_FUNCTIONS: dict[str, Any] = {
    "torch.Size": _size,
    "torch.serialization._get_layout": _layout,
    f"{_META}._MEM_FORMAT_ENCODING": _mem_format,
    f"{_SHARDED}.MEM_FORMAT_ENCODING": _mem_format,
    "pathlib.Path": _path,  # StorageMeta.checkpoint_id: kept as a string, never used
    "pathlib.PosixPath": _path,
    "pathlib.PurePosixPath": _path,
    "pathlib.WindowsPath": _windows_path,
    "pathlib.PureWindowsPath": _windows_path,
    "collections.OrderedDict": dict,
}


class _Dtype:
    """A torch dtype named in `.metadata` (`torch.float32`), kept as its name; a pickle cannot BUILD onto it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("state for a torch dtype")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only `_RECORDS`, the few value constructors in `_FUNCTIONS` and torch dtypes (as names); any other
    global, and any persistent id, is refused before anything is imported."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _RECORDS:
            return _RECORDS[full]
        if full in _FUNCTIONS:
            return _FUNCTIONS[full]
        if module == "torch" and _torch_kind(name) == "dtype":
            return _Dtype(name)
        if module == "torch" and _torch_kind(name) in ("layout", "memory_format"):
            return name  # deprecated TensorProperties fields, pickled as globals by older torch
        raise _Refused(full)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id (DCP metadata has none)")


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _torch_kind(name: str) -> str | None:
    """ "dtype", "layout" or "memory_format" for a public torch constant of that type (`torch.float32`)."""
    import torch

    value = getattr(torch, name, None) if not name.startswith("_") else None
    for kind in ("dtype", "layout", "memory_format"):
        if isinstance(value, getattr(torch, kind)):
            return kind
    return None


def unpickle_metadata(meta: Path, data: bytes) -> Any:
    """The object pickled in a `.metadata` file, built from inert records; `UnsafeCheckpointError` names a global
    outside DCP's metadata classes."""
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        shown = e.name if e.name.isprintable() else repr(e.name)
        raise UnsafeCheckpointError(
            f"{meta}: refused to unpickle global {shown[:200]}; a DCP {METADATA_NAME} may only name "
            "torch.distributed.checkpoint's metadata classes (it is not loaded with plain pickle)"
        ) from None
    except RecursionError:
        raise BadInputError(f"{meta}: not a DCP metadata file (nested too deeply)") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError... from a damaged stream
        raise BadInputError(f"{meta}: not a DCP metadata file ({type(e).__name__}: {str(e)[:200]})") from None


def parse_metadata(meta: Path, data: bytes) -> DcpLayout:
    """Unpickle `.metadata` safely and check it: every field typed as DCP writes it, chunk boxes inside their
    tensor and tiling it exactly, every non-empty chunk stored in a plain file of the folder."""
    obj = unpickle_metadata(meta, data)

    def bad(why: str) -> BadInputError:
        return BadInputError(f"{meta}: not a valid DCP metadata file ({why})")

    if not isinstance(obj, _Record) or obj.kind != "Metadata":
        raise bad(f"holds a {type(obj).__name__}, not a torch.distributed.checkpoint Metadata")
    top = obj.fields()
    entries = top.get("state_dict_metadata")
    storage = top.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise bad("state_dict_metadata and storage_data must be mappings")
    where = _storage_index(storage, bad)
    tensors: dict[str, DcpTensor] = {}
    objects: list[str] = []
    for k, entry in entries.items():
        if not isinstance(k, str):
            raise bad(f"a key of type {type(k).__name__}")
        if isinstance(entry, _Record) and entry.kind == "BytesStorageMetadata":
            objects.append(k)
        elif isinstance(entry, _Record) and entry.kind == "TensorStorageMetadata":
            tensors[k] = _tensor(k, entry.fields(), where, bad)
        else:
            raise bad(f"entry {_brief(k)} is a {getattr(entry, 'kind', '') or type(entry).__name__}")
    files = sorted({info[0] for info in where.values()})
    extents = tuple((k, *info) for (k, _), info in where.items())
    version = top.get("version")
    return DcpLayout(tensors, _paths(top.get("planner_data"), entries, bad), tuple(objects), tuple(files), extents,
                     version if isinstance(version, str) else None)  # fmt: skip


def _storage_index(storage: dict[Any, Any], bad: Any) -> dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]]:
    """(key, chunk offsets or None for an object) -> (file, byte offset, length), checked."""
    where: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for index, info in storage.items():
        if not (isinstance(index, _Record) and index.kind == "MetadataIndex"):
            raise bad("a storage_data key that is not a MetadataIndex")
        if not (isinstance(info, _Record) and info.kind == "_StorageInfo"):
            raise bad("a storage_data value that is not a _StorageInfo")
        i, s = index.fields(), info.fields()
        fqn, offsets = i.get("fqn"), i.get("offset")
        if not isinstance(fqn, str) or not (offsets is None or isinstance(offsets, tuple)):
            raise bad("a MetadataIndex without a key")
        name, offset, length = s.get("relative_path"), s.get("offset"), s.get("length")
        if not isinstance(name, str) or type(offset) is not int or type(length) is not int:
            raise bad(f"storage of {_brief(fqn)}: relative_path, offset and length must be a string and integers")
        if offset < 0 or length < 0:
            raise bad(f"storage of {_brief(fqn)}: negative offset or length")
        if not _plain_file_name(name):
            raise bad(f"storage of {_brief(fqn)} in {_brief(name)}: not a file of the checkpoint's folder")
        transforms = s.get("transform_descriptors")
        if transforms:
            shown = ", ".join(str(t)[:40] for t in transforms) if isinstance(transforms, (list, tuple)) else "?"
            raise BadInputError(
                f"{_brief(fqn)} is stored through DCP stream transforms ({shown}); mmsurgery reads only "
                "untransformed chunks: load the checkpoint with torch and save it again without extensions"
            )
        where[(fqn, offsets)] = (name, offset, length)
    return where


def _plain_file_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..", METADATA_NAME)
        and not any(c in name for c in "/\\\x00")
        and name.isprintable()
    )


def _tensor(
    key: str, fields: dict[str, Any], where: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]], bad: Any
) -> DcpTensor:
    props, shape, chunks = fields.get("properties"), fields.get("size"), fields.get("chunks")
    if not (isinstance(props, _Record) and props.kind == "TensorProperties"):
        raise bad(f"{_brief(key)}: no TensorProperties")
    dtype = _dtype_of(props)
    if dtype is None:
        raise bad(f"{_brief(key)}: no dtype")
    if not _is_shape(shape) or not isinstance(chunks, list):
        raise bad(f"{_brief(key)}: size must be a shape of non-negative integers, chunks a list")
    if math.prod(max(d, 1) for d in shape) >= 2**63:
        raise bad(f"{_brief(key)}: shape {list(shape)[:8]} has more elements than torch can lay out")
    itemsize = _itemsize(dtype)
    out: list[DcpChunk] = []
    for c in chunks:
        if not (isinstance(c, _Record) and c.kind == "ChunkStorageMetadata"):
            raise bad(f"{_brief(key)}: a chunk that is not a ChunkStorageMetadata")
        f = c.fields()
        offsets, sizes = f.get("offsets"), f.get("sizes")
        if not (_is_shape(offsets) and _is_shape(sizes) and len(offsets) == len(sizes) == len(shape)):
            raise bad(f"{_brief(key)}: a chunk whose offsets or sizes do not match the tensor's {len(shape)} dims")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise bad(f"{_brief(key)}: chunk at {list(offsets)} of size {list(sizes)} lies outside {list(shape)}")
        if not math.prod(sizes):
            continue  # an empty shard (FSDP2 gives λ, shape [1], to the first rank only): nothing to read
        stored = where.get((key, offsets))
        if stored is None:
            raise bad(f"{_brief(key)}: chunk at {list(offsets)} has no storage entry")
        if stored[2] < math.prod(sizes) * itemsize:  # DCP saves each chunk with minimal storage: never less
            raise bad(
                f"{_brief(key)}: chunk at {list(offsets)} is stored in {stored[2]} bytes, its "
                f"{math.prod(sizes)} elements need {math.prod(sizes) * itemsize}"
            )
        out.append(DcpChunk(offsets, sizes, *stored))
    _check_tiling(key, shape, out, bad)
    return DcpTensor(key, dtype, shape, tuple(out))


def _dtype_of(props: _Record) -> str | None:
    """TensorProperties pickles `(dtype, layout, requires_grad, memory format, pin_memory)` through its
    `__getstate__`; torch 2.0's pickled its `__dict__`."""
    state = props.state
    dtype = state[0] if isinstance(state, tuple) and state else props.fields().get("dtype")
    ok = isinstance(dtype, _Dtype) and isinstance(dtype.name, str) and _torch_kind(dtype.name) == "dtype"
    return dtype.name if ok else None


def _itemsize(dtype: str) -> int:
    import torch

    return int(getattr(torch, dtype).itemsize)


def _is_shape(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(d) is int and d >= 0 for d in value)


def _check_tiling(key: str, shape: tuple[int, ...], chunks: list[DcpChunk], bad: Any) -> None:
    """The chunks cover the tensor exactly: as many elements as it has, and no two overlapping (a sweep along
    dim 0 compares only chunks whose rows overlap, so FSDP's row shards cost one comparison each)."""
    covered = sum(c.numel for c in chunks)
    if covered != math.prod(shape):
        raise bad(f"{_brief(key)}: its chunks hold {covered} elements, the tensor {math.prod(shape)}")
    active: list[DcpChunk] = []
    for c in sorted(chunks, key=lambda c: c.offsets):
        if not shape:
            break  # a 0-d tensor: one chunk of one element (counted above)
        active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
        for a in active:
            if _overlap(a, c):
                raise bad(f"{_brief(key)}: chunks at {list(a.offsets)} and {list(c.offsets)} overlap")
        active.append(c)


def _overlap(a: DcpChunk, b: DcpChunk) -> bool:
    spans = zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
    return all(max(ao, bo) < min(ao + az, bo + bz) for ao, az, bo, bz in spans)


def _paths(planner: Any, entries: dict[str, Any], bad: Any) -> dict[str, tuple[str, ...]]:
    """Each key's place in the saved (nested) state dict: DCP's default planner flattens `{"model": {...}}` to
    `model.<name>` and records `("model", "<name>")` in `planner_data`; without it a key is its own path."""
    paths: dict[str, tuple[str, ...]] = {}
    mapping = planner if isinstance(planner, dict) else {}
    for k in entries:
        p = mapping.get(k)
        if isinstance(p, (tuple, list)) and p and all(isinstance(x, (str, int)) and type(x) is not bool for x in p):
            paths[k] = tuple(str(x) for x in p)
        elif p is None:
            paths[k] = (k,)
        else:
            raise bad(f"planner_data of {_brief(k)} is not a path of names")
    return paths


def _brief(text: str, limit: int = 80) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'"
