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

from mmsurgery.errors import BadInputError, UnsafeCheckpointError

SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)
ZIP_MAGIC = b"PK\x03\x04"  # what torch.load itself checks to tell its zip format from a legacy pickle


def load_pickle(path: Path) -> Any:
    """`torch.load` with `weights_only=True`, memory-mapped where the file format allows it.

    Anything a damaged file makes the zip reader or torch raise becomes one `BadInputError`, and warnings (torch's
    "Detected pickle protocol 3", pickletools' while naming unsafe globals) are silenced: stderr stays one line.
    """
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
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # zipfile and torch raise BadZipFile, RuntimeError, EOFError, UnicodeDecodeError...
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None


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
    """Name the globals that made `weights_only` refuse the file, found without executing anything."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        found = [g for g in _scan_globals(path) if not g.startswith(_TRUSTED_MODULES)]
    safe = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    found = [g for g in found if g not in safe]
    return sorted(set(found)) or re.findall(r"GLOBAL ([\w.]+)", message)


_TRUSTED_MODULES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")


def _scan_globals(path: Path) -> list[str]:
    """Every global a pickle stream (or a sequence of them, as legacy torch.save writes) would import."""
    found: list[str] = []
    with path.open("rb") as raw:
        f = _Clamped(raw)
        while True:
            strings: list[str] = []
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:
                break
            if f.at_end():
                break
    return found


def _first_line(e: BaseException) -> str:
    """The reason, one line: `KeyError: 10` rather than a bare `10`, and for a weights_only refusal its own
    reason rather than torch's advice to retry with `weights_only=False`."""
    text, kind = str(e), type(e).__name__
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    if found:
        text, kind = found.group(1), "weights_only"
    lines = text.strip().splitlines()
    return f"{kind}: {lines[0][:200]}" if lines else kind
