"""Reading and validating a safetensors header with the standard library only.

The header is all `inspect` needs, so a multi-GB file is described from its first few kilobytes. Validation
here turns a truncated or corrupt file into one clear `BadInputError` before any tensor is touched.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from mmsurgery.checkpoint.dtypes import SAFETENSORS_DTYPES
from mmsurgery.errors import BadInputError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str  # report name, e.g. "float32"
    shape: tuple[int, ...]
    begin: int  # byte offsets inside the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; raise `BadInputError` on anything malformed."""
    file_size = path.stat().st_size
    where = f"{path}: not a valid safetensors file"
    if file_size < 8:
        raise BadInputError(f"{where} (only {file_size} bytes)")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise BadInputError(f"{where} (header length {n} does not fit a {file_size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{where} (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{where} (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInputError(f"{where} (__metadata__ must map strings to strings)")
    data_len = file_size - 8 - n
    entries: dict[str, HeaderEntry] = {}
    for name, spec in header.items():
        entries[name] = _entry(name, spec, data_len, where)
    _check_coverage(entries, data_len, where)
    return SafetensorsHeader(path, entries, dict(metadata), 8 + n, file_size)


def _entry(name: str, spec: object, data_len: int, where: str) -> HeaderEntry:
    try:
        code, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]  # type: ignore[index]
        shape = tuple(int(s) for s in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise BadInputError(f"{where} (malformed entry for tensor {name!r})") from None
    if code not in SAFETENSORS_DTYPES:
        raise BadInputError(f"{where} (tensor {name!r} has unknown dtype {code!r})")
    dtype, itemsize = SAFETENSORS_DTYPES[code]
    if any(s < 0 for s in shape) or not 0 <= begin <= end:
        raise BadInputError(f"{where} (tensor {name!r} has a negative shape or offsets)")
    if end > data_len:
        raise BadInputError(
            f"{where}: truncated (tensor {name!r} ends at byte {end} of a {data_len}-byte data section)"
        )
    if (end - begin) != math.prod(shape) * itemsize:
        raise BadInputError(f"{where} (tensor {name!r}: {end - begin} bytes do not match shape {list(shape)})")
    return HeaderEntry(name, dtype, shape, begin, end)


def _check_coverage(entries: dict[str, HeaderEntry], data_len: int, where: str) -> None:
    """Tensors must tile the data section exactly, as safetensors requires: no gaps, no overlap."""
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            raise BadInputError(f"{where} (tensor {e.name!r} starts at {e.begin}, expected {pos})")
        pos = e.end
    if pos != data_len:
        raise BadInputError(f"{where}: {data_len - pos} unexpected bytes after the last tensor")


_STRUCT = {"float32": "f", "float64": "d", "float16": "e"}


def decode_floats(raw: bytes, dtype: str) -> list[float]:
    """Little-endian tensor bytes → Python floats, for the few small tensors read without torch (λ)."""
    if dtype == "bfloat16":
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
    if dtype not in _STRUCT:
        raise BadInputError(f"cannot read {dtype} values as floats")
    code = _STRUCT[dtype]
    return list(struct.unpack(f"<{len(raw) // struct.calcsize(code)}{code}", raw))
