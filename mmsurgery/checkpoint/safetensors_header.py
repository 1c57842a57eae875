"""Reading and validating a safetensors header with the standard library only.

The header is all `inspect` needs, so a multi-GB file is described from its first few kilobytes. Validation
here turns a truncated or corrupt file into one clear `BadInputError` before any tensor is touched.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmsurgery.checkpoint.dtypes import SAFETENSORS_DTYPES
from mmsurgery.errors import BadInputError

__all__ = [
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "MAX_HEADER_BYTES",
    "MAX_INT_DIGITS",
    "MAX_TENSORS",
    "HeaderEntry",
    "SafetensorsHeader",
    "decode_floats",
    "read_header",
]

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
MAX_INT_DIGITS = 20  # 2**64 - 1 has 20 digits: no valid offset or dimension is longer
_LONG_DIGITS = re.compile(rb"\d{%d}" % (MAX_INT_DIGITS + 1))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way valid UTF-8 JSON can spell a lone surrogate
MAX_ELEMENTS = 2**63 - 1  # torch sizes are int64: more elements than this cannot be a tensor
MAX_DIMS = 64  # no checkpoint tensor comes near; a shape of millions of zeros would otherwise cost seconds and GBs
MAX_TENSORS = 500_000  # per file, and per sharded set; a header of a million tiny tensors cost 25 s and 1 GB to parse


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


def read_header(path: Path, fd: int | None = None) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; raise `BadInputError` on anything malformed.

    With `fd` (an open descriptor on `path`) the header is read through it, so it is the header of that very file
    even if `path` has been replaced since; `path` then only names the file in messages.

    The rules are the format's own (what the `safetensors` library accepts): a JSON object whose entries each have
    a dtype string, a shape list of non-negative integers and `data_offsets` [begin, end], tiling the data section
    exactly; `__metadata__` maps strings to strings. Nothing is coerced: `"2"`, `2.0` or `true` is not an integer.
    Every size is checked against the file before anything is allocated.
    """
    if fd is None:
        with path.open("rb") as f:
            return read_header(path, f.fileno())
    file_size = os.fstat(fd).st_size
    where = f"{path}: not a valid safetensors file"
    if file_size < 8:
        raise BadInputError(f"{where} (only {file_size} bytes)")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise BadInputError(f"{where} (header length {n} does not fit a {file_size}-byte file)")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise BadInputError(f"{where} (truncated while its header was read)")
    listed = raw.count(b'"data_offsets"')  # one per tensor: a bound checked in C, before any entry is built
    if listed > MAX_TENSORS:
        raise BadInputError(
            f"{where} (its header lists {listed:,} tensors, more than the {MAX_TENSORS:,} mmsurgery reads)"
        )
    with _gc_paused():
        return _parsed(path, raw, file_size, where)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a header's objects are built: they form no cycles, and the collections
    that hundreds of thousands of new objects trigger were 40% of the time a large header took."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parsed(path: Path, raw: bytes, file_size: int, where: str) -> SafetensorsHeader:
    n = len(raw)
    header = _parse_json(raw, where)
    if not isinstance(header, dict):
        raise BadInputError(f"{where} (header is {_kind(header)}, not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInputError(f"{where} (__metadata__ must map strings to strings)")
    problem = _json_problem(list(metadata.values()))
    if problem:
        raise BadInputError(f"{where} (__metadata__: {problem})")
    data_len = file_size - 8 - n
    entries: dict[str, HeaderEntry] = {}
    for name, spec in header.items():
        entries[name] = _entry(name, spec, data_len, where)
    _check_coverage(entries, data_len, where)
    return SafetensorsHeader(path, entries, dict(metadata), 8 + n, file_size)


class _Refused(ValueError):
    """JSON that Python would read but the format (serde_json in the safetensors library) does not allow."""


def _parse_json(raw: bytes, where: str) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{where} (header is not UTF-8: {e.reason} at byte {e.start})") from None
    # A Python call per number costs 4x on a header of millions of them; it is only needed where a `-0` or a
    # 21-digit run appears (usually inside a string, where it is harmless), so only then is it paid.
    exact = {"parse_int": _bounded_int} if b"-0" in raw or _LONG_DIGITS.search(raw) else {}
    try:
        hook = _Objects(surrogates=_SURROGATE_ESCAPE.search(raw) is not None)
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=hook, **exact)
    except RecursionError:
        raise BadInputError(f"{where} (header JSON is nested too deeply)") from None
    except _TooMany as e:
        raise BadInputError(f"{where} ({e})") from None
    except MemoryError:
        raise BadInputError(f"{where} (a {len(raw):,}-byte header too large to parse in memory)") from None
    except ValueError as e:  # JSONDecodeError, _Refused
        raise BadInputError(f"{where} (header is not valid JSON: {str(e)[:200]})") from None


class _TooMany(_Refused):
    """More objects than a header of `MAX_TENSORS` tensors holds."""


def _no_constant(name: str) -> object:
    raise _Refused(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int | float:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits")
    return -0.0 if text == "-0" else int(text)  # serde_json reads `-0` as a float, so no size may be written so


class _Objects:
    """The `object_pairs_hook` of one header: each object's keys distinct and valid Unicode, and no more objects
    than `MAX_TENSORS` entries (plus `__metadata__` and the header itself) can need. The count bounds a header
    that spells its keys with escapes (`"data\\u005foffsets"`), which the count of `"data_offsets"` before
    parsing does not see: the parse stops there, not after building every entry."""

    def __init__(self, *, surrogates: bool) -> None:
        self.count = 0
        self.surrogates = surrogates  # whether the text may spell one at all: else no key is checked

    def __call__(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        self.count += 1
        if self.count > MAX_TENSORS + 2:
            raise _TooMany(f"its header lists more than {MAX_TENSORS:,} tensors, the most mmsurgery reads")
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _value in pairs:
                if key in seen:
                    raise _Refused(f"duplicate key {_brief(key)}")
                seen.add(key)
        if self.surrogates:
            for key in out:
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Refused(f"key {_brief(key)} is not valid Unicode (a lone surrogate)") from None
        return out


def _json_problem(value: object) -> str | None:
    """What in `value` the format's JSON parser (serde_json) refuses though Python's accepts: a string with a lone
    surrogate, a number out of float range (`1e400`). Walked iteratively: the value may be nested deeply."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"string {_brief(v)} is not valid Unicode (a lone surrogate)"
        elif isinstance(v, float) and not math.isfinite(v):
            return "a number out of range"
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    return None


def _is_size(v: object) -> bool:
    """A JSON integer torch can take as a size (0 to 2**63 - 1): not a bool, a float or a string of digits."""
    return type(v) is int and 0 <= v <= MAX_ELEMENTS


def _entry(name: str, spec: object, data_len: int, where: str) -> HeaderEntry:
    tensor = f"{where} (tensor {_brief(name)}"
    if not isinstance(spec, dict):
        raise BadInputError(f"{tensor}: expected an object with dtype, shape and data_offsets, got {_kind(spec)})")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in spec]
    if missing:
        raise BadInputError(f"{tensor}: no {', '.join(missing)})")
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    problem = _json_problem([v for k, v in spec.items() if k not in ("dtype", "shape", "data_offsets")])
    if problem:  # unknown fields are allowed, as safetensors allows them, but must still be valid JSON
        raise BadInputError(f"{tensor}: {problem})")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise BadInputError(f"{tensor} has unknown dtype {_brief(code)})")
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise BadInputError(f"{tensor}: shape has {len(shape)} dimensions, more than the {MAX_DIMS} mmsurgery reads)")
    if not isinstance(shape, list) or not all(_is_size(s) for s in shape):
        raise BadInputError(f"{tensor}: shape must be a list of integers from 0 to 2**63 - 1, got {_brief(shape)})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise BadInputError(f"{tensor}: data_offsets must be [begin, end] integers, got {_brief(offsets)})")
    dtype, itemsize = SAFETENSORS_DTYPES[code]
    begin, end = offsets
    if begin > end:
        raise BadInputError(f"{tensor}: data_offsets [{begin}, {end}] end before they begin)")
    if end > data_len:
        raise BadInputError(
            f"{where}: truncated (tensor {_brief(name)} ends at byte {end} of a {data_len}-byte data section)"
        )
    numel = _numel(shape)
    if numel is None:
        raise BadInputError(f"{tensor}: shape {_brief(shape)} overflows (its dimensions multiply past 2**63 - 1))")
    if end - begin != numel * itemsize:
        raise BadInputError(f"{tensor}: {end - begin} bytes do not match shape {_brief(shape)} of {code})")
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def _numel(shape: list[int]) -> int | None:
    """Elements of `shape`, or None when torch could not lay it out: its nonzero dimensions (which the strides
    are made of, even for an empty tensor) multiply past 2**63 - 1. The product stops at the first step past it,
    so a hostile shape never builds a number of thousands of digits."""
    n = 1
    for s in shape:
        n *= max(s, 1)
        if n > MAX_ELEMENTS:
            return None
    return 0 if 0 in shape else n


def _check_coverage(entries: dict[str, HeaderEntry], data_len: int, where: str) -> None:
    """Tensors must tile the data section exactly, as safetensors requires: no gaps, no overlap."""
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            raise BadInputError(f"{where} (tensor {_brief(e.name)} starts at {e.begin}, expected {pos})")
        pos = e.end
    if pos != data_len:
        raise BadInputError(f"{where}: {data_len - pos} unexpected bytes after the last tensor")


def _kind(v: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a bool", float: "a number", int: "a number"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _brief(v: object, limit: int = 60) -> str:
    """A value for a one-line message: short, and safe on anything JSON can hold (a 5,000-digit number, a list
    nested 900 deep)."""
    if isinstance(v, list) and all(x is None or type(x) in (int, float, bool, str) for x in v[:8]):
        text = "[" + ", ".join(_brief(x, 24) for x in v[:8]) + (f", ... ({len(v)} entries)]" if len(v) > 8 else "]")
    elif isinstance(v, str):
        text = repr(v)
    elif type(v) in (int, float, bool) or v is None:
        text = json.dumps(v) if type(v) is not int or abs(v) < 10**20 else "a huge number"  # type: ignore[operator]
    else:
        return _kind(v)
    return text if len(text) <= limit else text[: limit - 4] + "..."


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
