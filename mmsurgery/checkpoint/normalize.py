"""Pure passes over a loaded pickle: unwrap the state dict from its wrapper, then strip wrapper prefixes.

Each pass takes and returns plain mappings, so each is tested alone (timm's `clean_state_dict` pattern).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmsurgery.errors import BadInputError

__all__ = ["MAX_DEPTH", "UNWRAP_KEYS", "WRAPPER_PREFIXES", "Unwrapped", "strip_prefixes", "unwrap"]

# Documented precedence (docs/formats.md): EMA weights first, as timm's `load_state_dict(use_ema=True)` does,
# then the plain training wrappers, then DINOv2's EMA `teacher`, then other common names.
UNWRAP_KEYS: tuple[str, ...] = (
    "state_dict_ema",
    "model_ema",
    "state_dict",
    "model",
    "module",
    "teacher",
    "model_state_dict",
    "base_model",
    "net",
)
MAX_DEPTH = 2
# Stripped from the front of every key, repeatedly, and only as prefixes (never `str.replace`).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Unwrapped:
    tensors: dict[str, Any]  # name -> torch.Tensor
    path: tuple[str, ...]  # wrapper keys descended into, outermost first
    alternatives: tuple[str, ...]  # other wrapper keys that also held tensors (e.g. an EMA copy not taken)
    ignored: dict[str, str] = field(default_factory=dict)  # non-tensor entries: name -> type


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "shape") and hasattr(x, "dtype")


def _holds_tensors(x: Any) -> bool:
    """Whether a mapping holds a tensor at any depth; iterative, and each mapping visited once, because an
    unpickled object may be nested thousands deep or contain itself."""
    seen: set[int] = set()
    todo = [x] if isinstance(x, Mapping) else []
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for v in m.values():
            if _is_tensor(v):
                return True
            if isinstance(v, Mapping):
                todo.append(v)
    return False


def unwrap(obj: Any, key: str | None = None) -> Unwrapped:
    """Find the state dict inside a loaded checkpoint.

    `key` (the CLI's `--key`) names the entry to take, `/`-separated for nested wrappers; otherwise the first
    key of `UNWRAP_KEYS` that holds tensors is taken, at most `MAX_DEPTH` levels deep.
    """
    if not isinstance(obj, Mapping):
        kind = type(obj).__name__
        raise BadInputError(f"checkpoint holds a {kind}, not a state dict (a mapping of names to tensors)")
    path: list[str] = []
    alternatives: list[str] = []
    ignored: dict[str, str] = {}

    def descend(entry: str) -> Any:
        for k, v in obj.items():
            if k != entry and "/".join([*path, str(k)]) not in alternatives:
                ignored["/".join([*path, str(k)])] = type(v).__name__
        path.append(entry)
        return obj[entry]

    if key is not None:
        for part in key.split("/"):
            if not isinstance(obj, Mapping) or part not in obj:
                have = ", ".join(sorted(str(k) for k in obj)[:12]) if isinstance(obj, Mapping) else ""
                raise BadInputError(f"--key {key!r}: no entry {part!r} (entries: {have or 'none'})")
            obj = descend(part)
        if not _holds_tensors(obj):
            raise BadInputError(f"--key {key!r} holds no tensors")
    else:
        for _ in range(MAX_DEPTH):
            if all(_is_tensor(v) for v in obj.values()):
                break
            found = [k for k in UNWRAP_KEYS if k in obj and _holds_tensors(obj[k])]
            if not found:
                break
            alternatives += ["/".join([*path, k]) for k in found[1:]]
            obj = descend(found[0])
    tensors: dict[str, Any] = {}
    for k, v in obj.items():
        if _is_tensor(v):
            if str(k) in tensors:
                raise BadInputError(f"two entries are both named {str(k)[:80]!r} (keys of different types)")
            tensors[str(k)] = v
    ignored |= {"/".join([*path, str(k)]): type(v).__name__ for k, v in obj.items() if not _is_tensor(v)}
    return Unwrapped(tensors, tuple(path), tuple(alternatives), ignored)


def strip_prefixes(tensors: Mapping[str, Any], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """Remove DDP's `module.` and torch.compile's `_orig_mod.` from the front of each key."""
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        short = name
        while True:
            hit = next((p for p in prefixes if short.startswith(p)), None)
            if hit is None:
                break
            short = short[len(hit) :]
        if short in out:
            raise BadInputError(f"keys {name!r} and {short!r} collide once wrapper prefixes are stripped")
        out[short] = value
    return out
