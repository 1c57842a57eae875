"""Loading `.pt/.pth/.bin/.ckpt` files with `torch.load(weights_only=True)` and nothing less.

timm training checkpoints pickle their `args` as an `argparse.Namespace`; that one global is allow-listed.
Any other global is refused with its name. There is no fallback to unsafe unpickling.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.pins import check_regular
from mmsurgery.errors import BadInputError, UnsafeCheckpointError

__all__ = ["SAFE_GLOBALS", "ZIP_MAGIC", "first_line", "load_pickle"]

SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)
ZIP_MAGIC = b"PK\x03\x04"  # what torch.load itself checks to tell its zip format from a legacy pickle


def load_pickle(path: Path) -> Any:
    """`torch.load` with `weights_only=True`, memory-mapped where the file format allows it.

    Anything a damaged file makes the zip reader or torch raise becomes one `BadInputError`, and warnings (torch's
    "Detected pickle protocol 3", pickletools' while naming unsafe globals) are silenced: stderr stays one line.
    A FIFO, socket or device is refused before it is opened (`pins.check_regular`).
    """
    check_regular(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load(path)


def _load(path: Path) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            if _is_zip(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=_check_zip(path))
            with path.open("rb") as f:  # the legacy format: torch reads every storage into memory anyway
                return torch.load(_Clamped(f), map_location="cpu", weights_only=True)
    except BadInputError:
        raise
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, str(e))
        if unsafe:
            names = ", ".join(g if g.isprintable() else repr(g) for g in unsafe[:6])[:300]
            more = f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else ""
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle unsafe global(s) {names}{more}; only tensors, containers and "
                "argparse.Namespace are allowed (re-save the checkpoint's state_dict, or convert it to safetensors)"
            ) from None
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    except Exception as e:  # zipfile and torch raise BadZipFile, RuntimeError, EOFError, UnicodeDecodeError...
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None


class _Clamped:
    """A file whose `read(n)` never asks for more than is left in it.

    Python's buffered `read(n)` allocates n bytes before reading, so a damaged pickle whose string length says
    4 GB would cost a 4 GB allocation to find 3 KB. Everything else (seek, tell, fileno for torch's direct storage
    reads) is the file's own.
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self._size = os.fstat(f.fileno()).st_size
        self.name = f.name

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self._f.read()
        return self._f.read(min(n, max(self._size - self._f.tell(), 0)))

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(limit)

    def readinto(self, b: Any) -> int:
        return self._f.readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()

    def at_end(self) -> bool:
        return self._f.tell() >= self._size


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def _check_zip(path: Path) -> bool:
    """Refuse a TorchScript archive, and a zip whose storage records do not hold exactly the bytes the pickle says
    its tensors need; True when every record was checked and memory-mapping the file is safe.

    `torch.load(mmap=True)` slices each storage out of the mapped file at its record's offset and trusts the
    length the pickle gives, so a record cut short would read whatever follows it (the next record, the zip
    directory) as weights. Without mmap torch checks the length itself: a pickle that cannot be scanned here, or a
    compressed record, is loaded that way (costing the file's size in memory) rather than refused.
    """
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if len(set(names)) != len(names):  # torch's reader takes one copy and zipfile another: refuse to guess
            raise BadInputError(f"{path}: a damaged PyTorch checkpoint (a record name appears twice in the zip)")
        if any(n.endswith("/code/") or "/code/__torch__" in n for n in names[:64]):
            raise BadInputError(
                f"{path}: a TorchScript archive, not a state dict; save `model.state_dict()` with torch.save instead"
            )
        archive = names[0].split("/", 1)[0] if names else ""  # torch reads `<first record's folder>/data.pkl`
        try:
            needs = _storage_bytes(z.read(f"{archive}/data.pkl"))
        except Exception:  # unreadable here: torch.load (without mmap) gives the reason
            return False
        safe = True
        for key, nbytes in needs.items():
            record = f"data/{key}"
            shown = repr(record[:60])
            try:
                info = z.getinfo(f"{archive}/{record}")
            except KeyError:
                raise BadInputError(f"{path}: a damaged PyTorch checkpoint (no storage record {shown})") from None
            if info.file_size != nbytes:
                raise BadInputError(
                    f"{path}: a damaged PyTorch checkpoint (storage record {shown} holds {info.file_size} bytes, "
                    f"its tensors need {nbytes})"
                )
            safe = safe and info.compress_type == zipfile.ZIP_STORED
    return safe


class _Stub:
    """Stands for every global a torch pickle names while it is scanned, so the scan imports and runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Stub:
        return _Stub()

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


class _StorageScan(pickle.Unpickler):
    """Reads a torch zip pickle only for its storage references: ('storage', type, key, location, numel)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.nbytes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:  # a storage type becomes its item size
        if name == "UntypedStorage" and module in ("torch", "torch.storage"):
            return 1
        if module == "torch" and name.endswith("Storage"):
            import torch

            return getattr(torch, name).dtype.itemsize  # a legacy storage class such as torch.FloatStorage
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        kind, itemsize, key, _, numel = pid
        if kind != "storage" or type(itemsize) is not int or type(numel) is not int or numel < 0:
            raise ValueError(f"unexpected storage reference {pid!r:.80}")
        self.nbytes[str(key)] = max(self.nbytes.get(str(key), 0), numel * itemsize)
        return _Stub()


def _storage_bytes(data: bytes) -> dict[str, int]:
    """Bytes each storage record must hold (record key -> bytes), from the pickle alone."""
    scan = _StorageScan(data)
    scan.load()
    return scan.nbytes


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """Name the globals that made `weights_only` refuse the file, found by reading its opcodes: nothing is imported
    or executed. Falls back to the global torch's own message names when the file cannot be scanned."""
    try:
        found = _scan_globals(path)
    except Exception:  # a zip directory zipfile cannot read: torch's message is all there is
        found = []
    allowed = _allowed_globals()
    found = [g for g in found if g not in allowed]
    return sorted(set(found)) or re.findall(r"GLOBAL ([\w.]+)", message)


def _allowed_globals() -> set[str]:
    """What `torch.load(weights_only=True)` imports without asking (its allow-list) plus `SAFE_GLOBALS`."""
    safe = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        from torch import _weights_only_unpickler

        return safe | set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # a torch without the private helper: name every global but the obviously harmless
        return safe | {
            "collections.OrderedDict",
            "builtins.set",
            "builtins.frozenset",
            "torch._utils._rebuild_tensor_v2",
        }


MAX_PICKLES = 5  # legacy torch.save: magic number, protocol, sys info, the object, storage keys; then raw bytes


def _scan_globals(path: Path) -> list[str]:
    """Every global a checkpoint's pickle would import: `<archive>/data.pkl` of a torch zip, else the file as a
    sequence of pickles (legacy torch.save writes five, then raw storage bytes)."""
    if _is_zip(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            archive = names[0].split("/", 1)[0] if names else ""  # the record torch.load itself reads
            with z.open(f"{archive}/data.pkl") as f:
                return _globals_in_stream(f, 1)
    with path.open("rb") as raw:
        return _globals_in_stream(_Clamped(raw), MAX_PICKLES)


_OPAQUE = object()  # any stack value that is not a string
_MARK = object()
_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}


def _globals_in_stream(f: Any, max_pickles: int) -> list[str]:
    """Globals named by up to `max_pickles` consecutive pickles in `f`, by simulating the unpickler's stack and memo
    with strings as the only values (pickletools decodes the opcodes; nothing is built).

    GLOBAL and INST carry `module name` inline; STACK_GLOBAL takes the two strings on the stack, which may come from
    the memo (MEMOIZE/PUT store the top, GET fetches), so the memo is tracked: a scan that took the last two
    strings in the stream named the wrong global. A name computed at load time is reported as such.
    """
    found: list[str] = []
    for _ in range(max_pickles):
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        try:
            for op, arg, _pos in pickletools.genops(f):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, qual = str(arg).partition(" ")
                    found.append(f"{module}.{qual}")
                elif name == "STACK_GLOBAL":
                    qual = stack.pop() if stack else _OPAQUE
                    module = stack.pop() if stack else _OPAQUE
                    if isinstance(module, str) and isinstance(qual, str):
                        found.append(f"{module}.{qual}")
                    else:
                        found.append("(a global whose name is computed while unpickling)")
                    stack.append(_OPAQUE)
                    continue
                elif name in ("EXT1", "EXT2", "EXT4"):
                    found.append(f"(copyreg extension code {arg})")
                if name in _STRING_OPS:
                    stack.append(arg if isinstance(arg, str) else _OPAQUE)
                elif name == "MEMOIZE":
                    memo[len(memo)] = stack[-1] if stack else _OPAQUE
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = stack[-1] if stack else _OPAQUE
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(int(arg), _OPAQUE))
                elif name == "DUP":
                    stack.append(stack[-1] if stack else _OPAQUE)
                elif name == "MARK":
                    marks.append(len(stack))
                else:
                    _generic_effect(op, stack, marks)
        except Exception:  # the end of the pickles (raw storage bytes follow) or a damaged stream
            break
        if getattr(f, "at_end", lambda: False)():
            break
    return found


def _generic_effect(op: Any, stack: list[Any], marks: list[int]) -> None:
    """Pop what `op` consumes (down to the last MARK where it takes a stack slice), push opaque results."""
    before = [s.name for s in op.stack_before]
    if "mark" in before:
        del stack[marks.pop() if marks else 0 :]
        below = before.index("mark")
    else:
        below = len(before)
    if below:
        del stack[-below:]
    stack.extend([_OPAQUE] * len(op.stack_after))


def first_line(e: BaseException) -> str:
    """The reason, one line: `KeyError: 10` rather than a bare `10`, and for a weights_only refusal its own
    reason rather than torch's advice to retry with `weights_only=False`."""
    text, kind = str(e), type(e).__name__
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    if found:
        text, kind = found.group(1), "weights_only"
    lines = text.strip().splitlines()
    line = lines[0][:200] if lines else ""
    if _RETRY_ADVICE.search(line):  # never pass on the advice to unpickle unsafely
        line = "refused by torch.load(weights_only=True)"
    return f"{kind}: {line}" if line else kind


_RETRY_ADVICE = re.compile(r"weights_only\W*(=|set to|to)\W*False|weights_only=False", re.IGNORECASE)
