"""Loading `.pt/.pth/.bin/.ckpt` files with `torch.load(weights_only=True)` and nothing less.

timm training checkpoints pickle their `args` as an `argparse.Namespace`; that one global is allow-listed.
Any other global is refused with its name. There is no fallback to unsafe unpickling.
"""

from __future__ import annotations

import argparse
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

from mmsurgery.errors import BadInputError, UnsafeCheckpointError

SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


def load_pickle(path: Path) -> Any:
    """`torch.load` with `weights_only=True`, memory-mapped where the file format allows it."""
    import torch

    is_zip = zipfile.is_zipfile(path)
    if is_zip and _is_torchscript(path):
        raise BadInputError(
            f"{path}: a TorchScript archive, not a state dict; save `model.state_dict()` with torch.save instead"
        )
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, str(e))
        if unsafe:
            names = ", ".join(unsafe)
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle unsafe global(s) {names}; only tensors, containers and "
                "argparse.Namespace are allowed (re-save the checkpoint's state_dict, or convert it to safetensors)"
            ) from None
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/code/") or "/code/__torch__" in n for n in z.namelist()[:64])


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
    with path.open("rb") as f:
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
            if not f.peek(1):
                break
    return found


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
