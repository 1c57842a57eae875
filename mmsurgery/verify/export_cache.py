"""An opt-in cache of ONNX exports, keyed by what shapes the graph, that binds new weights into a cached graph.

The dynamo export dominates every gate (ViT-S 15 s, ViT-L 30 s on 2 cores), and a CI gate usually re-exports the
same architecture with new weights. An entry holds one export's graph without its weights (the *skeleton*) and a
*recipe*: which state tensor, through which exact transform (identity, reshape, permutation), fills each
initializer. `bind` writes the skeleton with another state's tensors put through the recipe, laid out as a fresh
export would be (`<dest>` + `<dest name>.data`).

The binding rule (what makes an entry sound):

1. **Two exports must agree.** A store keeps its export; an entry binds only once a second export of the same key
   agrees with it on everything but the recipe-bound initializers: same graph bytes, every constant (any dtype,
   in initializers, node attributes, subgraphs) bit-identical, same recipe, same data layout. Matching values is
   not enough on its own: an exporter folds `scale.sum()` or `logit_scale.exp()` into small float constants that
   equal no transform of any weight, exactly like the attention scale it also folds (ViT: `val_58` = 0.5), so
   "tiny and unexplained" cannot tell a config constant from a stale weight. A second export with other weights
   can: a weight-derived constant changes, and the entry is never made bindable. A later export that disagrees
   with a bindable entry although the entry would have bound its weights proves the entry wrong: it starts again.
   The cost: a key's first two gates export; the third binds.
2. **Only what was seen to vary may vary.** Each state tensor is either *varied* (it differed between agreeing
   exports, so the graph's constants and structure do not depend on it) or *pinned* to the first export's
   sha256. `bind` refuses a state that differs in a pinned tensor. This also covers tensors the graph does not
   use (an all-zero Gemm bias the exporter dropped, a LayerNorm weight deduplicated against an equal one).
3. **No value the exporter treats specially.** onnxscript 0.7 rewrites by value: it drops all-zero Conv/Gemm
   biases, removes `x * 1` / `x + 0` with scalar constants, and shares one initializer between equal ones of up to
   1,024 elements. `bind` refuses a state whose bound initializers are uniform (all elements equal; scalars 0, ±1)
   or equal to another initializer of up to 65,536 elements, so the bound graph is what a fresh export gives.
4. **Never trust the entry.** One file per key, sha256 over everything after its digest, checked with the format
   version, the key, the recipe against the state (names, shapes, dtypes) before a byte is written; anything
   else is a miss with the reason, never an exception.

What it cannot see (the key's job): code outside the files that define the model's module classes (a helper in
another file), and value-dependent exporter behaviour beyond rule 3 in versions other than the pinned ones; a
dependence that happens to give equal constants at every witnessed state (a sign test) is not detected either.

Entry file `<root>/<key>.entry`: `MAGIC` · sha256 of the rest · u64 header length · header JSON · skeleton
(ModelProto bytes, bound inline initializers emptied, external locations blanked) · constants (the bytes of
external initializers the recipe does not bind). Written to a temp file beside it and renamed into place, so
concurrent stores leave one whole entry. onnx is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import itertools
import json
import logging
import os
import platform
import re
import secrets
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

import mmsurgery
from mmsurgery.checkpoint import publish
from mmsurgery.checkpoint.writer import WRITE_PIECE

__all__ = ["FORMAT", "ExportCache", "Outcome", "cache_key", "versions"]

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of the entry layout and of the key's contents; an entry of another format is a miss."""

MAGIC = b"MMSXCACH"
_HEAD = struct.Struct("<8s32sQ")  # magic, sha256 of everything after it, header length
_DEDUP_CHECK = 1 << 16  # elements; onnx_ir 1.1 deduplicates initializers of up to 1,024
_SAMPLES = 16  # elements compared before a full comparison, when matching a value to a weight
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_ONNX_TO_TORCH = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnx_ir": ("onnx-ir", "onnx_ir"),
    "onnxscript": ("onnxscript",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
}


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What `bind` or `store` did. `hit`: `dest` now holds the bound graph. `stored`: the cache now holds a
    bindable entry this export agrees with. `reason` says why, or why not, in one line."""

    hit: bool = False
    stored: bool = False
    reason: str


class _Miss(Exception):
    """An entry or a graph that cannot be used; the message is the outcome's reason."""


# ---- the key ---------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of everything that shapes an export, read from package metadata (nothing is imported)."""
    found = {"python": platform.python_version(), "mmsurgery": mmsurgery.__version__}
    for name, dists in _DISTRIBUTIONS.items():
        found[name] = "absent"
        for dist in dists:
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def _source_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of each source file defining a class of the model's modules (their MROs) or its forward: an edited
    forward (or a moved line, which the graph's stack-trace metadata records) must not find an old graph."""
    objects: list[Any] = [getattr(model.forward, "__func__", model.forward)]
    for cls in {type(m) for m in model.modules()}:
        objects.extend(c for c in cls.__mro__ if c is not object)
    digests: dict[str, str] = {}
    for obj in objects:
        try:
            path = inspect.getsourcefile(obj)
        except TypeError:  # a builtin
            continue
        if path and path not in digests:
            try:
                digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except OSError:
                digests[path] = "unreadable"
    return dict(sorted(digests.items()))


def cache_key(
    *,
    model: nn.Module,
    config: Mapping[str, Any],
    example: Tensor | Sequence[Tensor],
    opset: int,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    max_batch: int,
) -> str:
    """sha256 of a canonical JSON of everything that shapes the exported graph except the weights' values: the
    model's class, module tree, training flags, forward parameters and source files, `config`, the example inputs'
    shapes after the batch dimension and dtypes (the batch dimension is dynamic, 1..`max_batch`), opset, graph
    names, the library versions, the cache format, and the state dict's and buffers' names, shapes and dtypes."""
    examples = (example,) if isinstance(example, Tensor) else tuple(example)
    cls = type(model)
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    described = {
        "format": FORMAT,
        "model": f"{cls.__module__}.{cls.__qualname__}",
        "modules": [[name, f"{type(m).__module__}.{type(m).__qualname__}"] for name, m in model.named_modules()],
        "training": [name for name, m in model.named_modules() if m.training],
        "forward": params,
        "code": _source_digests(model),
        "config": dict(config),
        "inputs": [[list(t.shape[1:]), str(t.dtype)] for t in examples],
        "dynamic_batch": {"dim": 0, "min": 1, "max": int(max_batch)},
        "opset": int(opset),
        "input_names": list(input_names) if input_names else None,
        "output_names": list(output_names) if output_names else None,
        "versions": versions(),
        "state": [[k, list(t.shape), str(t.dtype)] for k, t in model.state_dict().items()],
        "buffers": [[k, list(t.shape), str(t.dtype)] for k, t in model.named_buffers()],
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- tensors ---------------------------------------------------------------------------------------------------
def _bits(t: Tensor) -> Tensor:
    """The tensor reinterpreted as integers of its width: equality of these is bit-identity (-0.0 != 0.0)."""
    return t.view(_BITS[t.element_size()])


def _bytes(t: Tensor, perm: Sequence[int] | None = None) -> memoryview:
    """The tensor's bytes after the recipe's permutation, as the exporter lays them out (one copy at most)."""
    t = t.detach().cpu()
    if perm is not None:
        t = t.permute(*perm)
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _sha256(data: memoryview | bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _uniform(t: Tensor) -> bool:
    flat = t.reshape(-1)
    n = flat.numel()
    if n == 0:
        return True
    if n > 2 and not (flat[0] == flat[n // 2] and flat[0] == flat[-1]):
        return False
    return bool((flat == flat[0]).all())


def _special(t: Tensor) -> bool:
    """Values an exporter rewrites by: uniform tensors (an all-zero bias is dropped), scalars 0 and ±1 (x·1, x+0)."""
    if not _uniform(t):
        return False
    return t.numel() != 1 or float(t.reshape(-1)[0]) in (0.0, 1.0, -1.0)


def _explain(
    name: str, value: Tensor, state: Mapping[str, Tensor], groups: dict[Any, list[str]], prefer: list[Any] | None
) -> list[Any] | None:
    """`[state name, permutation or None]` whose transform is bit-identical to `value`, or None (a constant). A
    value named like a weight is matched to it; any other must have at least two distinct elements to be matched at
    all, so a scalar or a uniform constant is never mistaken for a weight that happens to hold the same bytes."""
    target = _bits(value).reshape(-1)
    own = state.get(name)
    fits = own is not None and own.dtype == value.dtype and own.shape == value.shape
    if fits and torch.equal(_bits(own.detach().cpu()).reshape(-1), target):
        return [name, None]
    if value.numel() < 2 or _uniform(value):
        return None
    names = groups.get((value.dtype, value.numel()), [])
    if prefer is not None and prefer[0] in names:
        names = [prefer[0], *(n for n in names if n != prefer[0])]
    positions = torch.linspace(0, value.numel() - 1, min(_SAMPLES, value.numel())).long()
    for source in names:
        bits = _bits(state[source].detach().cpu())
        perms = list(itertools.permutations(range(bits.dim()))) if bits.dim() <= 4 else [tuple(range(bits.dim()))]
        for perm in perms:
            view = bits.permute(*perm)
            sample = view[torch.unravel_index(positions, view.shape)]
            if torch.equal(sample, target[positions]) and torch.equal(view.reshape(-1), target):
                return [source, None if list(perm) == sorted(perm) else list(perm)]
    return None


def _all_tensors(model: Any) -> Iterator[tuple[str, Any, bool]]:
    """(label, TensorProto, is a main-graph initializer) for every tensor of the model: initializers, node
    attributes, subgraphs and local functions. Sparse tensors raise: the cache does not handle them."""
    import onnx

    def graph(g: Any, prefix: str, top: bool) -> Iterator[tuple[str, Any, bool]]:
        if len(g.sparse_initializer):
            raise _Miss("the graph has sparse initializers, which the cache does not handle")
        for init in g.initializer:
            yield prefix + init.name, init, top
        yield from nodes(g.node, prefix)

    def nodes(ns: Any, prefix: str) -> Iterator[tuple[str, Any, bool]]:
        for i, node in enumerate(ns):
            where = f"{prefix}{node.name or i}/"
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield where + a.name, a.t, False
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from ((f"{where}{a.name}[{j}]", t, False) for j, t in enumerate(a.tensors))
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from graph(a.g, f"{where}{a.name}/", False)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for j, g in enumerate(a.graphs):
                        yield from graph(g, f"{where}{a.name}[{j}]/", False)
                elif a.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                    raise _Miss(f"node {where[:-1]} has a sparse tensor attribute, which the cache does not handle")

    yield from graph(model.graph, "", True)
    for f in model.functions:
        yield from nodes(f.node, f"{f.domain}::{f.name}/")


def _external(tensor: Any) -> dict[str, str] | None:
    return {e.key: e.value for e in tensor.external_data} if tensor.data_location == 1 else None


def _set_location(tensor: Any, location: str) -> None:
    for e in tensor.external_data:
        if e.key == "location":
            e.value = location


def _as_tensor(data: bytes | bytearray, tensor: Any) -> Tensor | None:
    """The initializer's value (a view of a bytearray, a copy of raw bytes), or None for a dtype the recipe skips."""
    dtype = _ONNX_TO_TORCH.get(tensor.data_type)
    shape = [int(d) for d in tensor.dims]
    if dtype is None:
        return None
    n = 1
    for d in shape:
        n *= d
    if len(data) != n * torch.empty((), dtype=dtype).element_size():
        raise _Miss(f"initializer {tensor.name}: {len(data)} bytes for {shape} of {_dtype_name(dtype)}")
    if not data:
        return torch.empty(shape, dtype=dtype)
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)


# ---- one export, taken apart -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _Entry:
    header: dict[str, Any]
    skeleton: bytes
    consts: bytes


def _take_apart(graph: Path, state: Mapping[str, Tensor], prefer: Mapping[str, Any]) -> _Entry:
    """The export at `graph` as a one-witness entry: skeleton, recipe, constants, and the state's digests."""
    import onnx

    if sys.byteorder != "little":
        raise _Miss("ONNX stores tensors little-endian; the cache runs on little-endian machines only")
    model = onnx.load(os.fspath(graph), load_external_data=False)
    spec: dict[str, dict[str, Any]] = {}
    groups: dict[Any, list[str]] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise _Miss(f"state tensor {name} has no data (meta device)")
        spec[name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _sha256(_bytes(t))}
        groups.setdefault((t.dtype, t.numel()), []).append(name)
    inline: dict[str, Any] = {}
    segments: list[dict[str, Any]] = []
    constants: dict[str, str] = {}
    marks: list[list[Any]] = []  # small main-graph constants, for bind's duplicate check
    consts = bytearray()
    location: str | None = None
    data: BinaryIO | None = None
    try:
        for label, tensor, top in _all_tensors(model):
            ext = _external(tensor)
            if ext is not None:
                if location is None:
                    location = ext.get("location", "")
                    if not location or Path(location).name != location:
                        raise _Miss(f"external data location {location!r} is not a file beside the graph")
                    data = open(graph.parent / location, "rb")  # noqa: SIM115 - closed in finally
                if ext.get("location") != location:
                    raise _Miss(f"{label}: external data in two files ({location}, {ext.get('location')})")
                offset, length = int(ext.get("offset", 0)), int(ext["length"])
                assert data is not None
                data.seek(offset)
                raw = bytearray(length)
                if data.readinto(raw) != length:
                    raise _Miss(f"{label}: {location} ends before its data ({offset} + {length} bytes)")
                _set_location(tensor, "")
            else:
                raw = tensor.raw_data if tensor.HasField("raw_data") else None
            value = _as_tensor(raw, tensor) if top and raw is not None else None
            source = _explain(tensor.name, value, state, groups, prefer.get(tensor.name)) if value is not None else None
            if source is not None and ext is None:
                inline[tensor.name] = source
                tensor.ClearField("raw_data")
            elif source is not None:
                segments.append({"offset": offset, "length": length, "name": tensor.name, "state": source[0]})
                segments[-1]["perm"] = source[1]
            elif ext is not None:
                constants[label] = _sha256(raw)
                segments.append({"offset": offset, "length": length, "const": len(consts)})
                consts += raw
            else:
                constants[label] = _sha256(tensor.SerializeToString())
            if source is None and value is not None and value.numel() <= _DEDUP_CHECK:
                marks.append([_dtype_name(value.dtype), value.numel(), _sha256(raw), label])
        data_bytes = os.fstat(data.fileno()).st_size if data is not None else 0
        segments.sort(key=lambda s: s["offset"])
        end = 0
        for s in segments:  # gaps (alignment padding) must be zeros, as bind writes them
            if s["offset"] < end:
                raise _Miss(f"external data overlaps at offset {s['offset']}")
            if s["offset"] > end and data is not None:
                data.seek(end)
                if any(data.read(s["offset"] - end)):
                    raise _Miss(f"{location} holds non-zero bytes between tensors at offset {end}")
            end = s["offset"] + s["length"]
        if end != data_bytes and data is not None:
            data.seek(end)
            if any(data.read()):
                raise _Miss(f"{location} holds non-zero bytes after its last tensor")
    finally:
        if data is not None:
            data.close()
    used = {src[0] for src in inline.values()} | {s["state"] for s in segments if "state" in s}
    for name in spec:
        spec[name]["varied"] = False
    header = {
        "format": FORMAT,
        "witnesses": 1,
        "inline": inline,
        "segments": segments,
        "data_bytes": data_bytes,
        "constants": constants,
        "marks": marks,
        "state": spec,
        "unused": [n for n in spec if n not in used],
        "versions": versions(),
    }
    return _Entry(header=header, skeleton=model.SerializeToString(), consts=bytes(consts))


def _recipe(header: Mapping[str, Any]) -> dict[str, Any]:
    """Bound initializer name -> `[state name, permutation]` (constants are in `header["constants"]`)."""
    found: dict[str, Any] = dict(header["inline"])
    found.update({s["name"]: [s["state"], s["perm"]] for s in header["segments"] if "state" in s})
    return found


def _disagreement(old: _Entry, new: _Entry) -> str | None:
    """Why two exports of one key cannot share an entry, naming what differs; None when they agree."""
    a, b = old.header, new.header
    specs = ({k: (v["dtype"], v["shape"]) for k, v in h["state"].items()} for h in (a, b))
    if next(specs) != next(specs):
        return "the state's names, shapes or dtypes differ"
    ra, rb = _recipe(a), _recipe(b)

    def what(h: Mapping[str, Any], recipe: Mapping[str, Any], name: str) -> str:
        if name in recipe:
            source, perm = recipe[name]
            return f"bound from {source}" + (f" permuted {tuple(perm)}" if perm else "")
        return "a constant" if name in h["constants"] else "absent"

    for name in sorted(set(ra) | set(rb)):
        if ra.get(name) != rb.get(name):
            return f"initializer {name} is {what(b, rb, name)} in this export, {what(a, ra, name)} in the entry's"
    ca, cb = a["constants"], b["constants"]
    changed = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        return f"constant(s) {shown} differ: computed from the weights, so no other weights can be bound"
    if old.skeleton != new.skeleton or old.consts != new.consts or a["data_bytes"] != b["data_bytes"]:
        return f"the graph differs ({len(new.skeleton):,} vs {len(old.skeleton):,} bytes without weights)"
    return None


def _pack(key: str, entry: _Entry) -> bytes:
    header = json.dumps({**entry.header, "key": key, "skeleton_bytes": len(entry.skeleton)}, sort_keys=True).encode()
    body = struct.pack("<Q", len(header)) + header + entry.skeleton + entry.consts
    return MAGIC + hashlib.sha256(body).digest() + body


def _unpack(key: str, blob: bytes) -> _Entry:
    if len(blob) < _HEAD.size:
        raise _Miss(f"the entry is truncated ({len(blob)} bytes)")
    magic, digest, size = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise _Miss("the entry is not an export cache entry")
    if hashlib.sha256(blob[40:]).digest() != digest:
        raise _Miss("the entry's digest does not match its contents (damaged, truncated or edited)")
    header = json.loads(blob[_HEAD.size : _HEAD.size + size])
    if header.get("format") != FORMAT:
        raise _Miss(f"the entry has cache format {header.get('format')}; this mmsurgery reads format {FORMAT}")
    if header.get("key") != key:
        raise _Miss(f"the entry was stored under key {str(header.get('key'))[:12]}…, not this one")
    start = _HEAD.size + size
    cut = start + int(header["skeleton_bytes"])
    consts = sum(s["length"] for s in header["segments"] if "const" in s)
    if cut + consts != len(blob):
        raise _Miss("the entry's sections do not add up to its size")
    return _Entry(header=header, skeleton=blob[start:cut], consts=blob[cut:])


# ---- writing ---------------------------------------------------------------------------------------------------
def _write_temp(path: Path, fill: Callable[[BinaryIO], None], *, durable: bool) -> Path:
    """A complete temp file beside `path` (named as `checkpoint.publish` names temps, so a dead writer's are
    cleaned), written by `fill`; the caller renames it into place."""
    tmp = path.parent / f"{publish.temp_prefix(path.name)}{secrets.token_hex(4)}{publish.TEMP_SUFFIX}"
    try:
        with open(tmp, "xb") as f:
            fill(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_pieces(f: BinaryIO, data: memoryview | bytes) -> None:
    view = memoryview(data)
    for start in range(0, view.nbytes, WRITE_PIECE):
        f.write(view[start : start + WRITE_PIECE])


class ExportCache:
    """A folder of entries, one file per key. See the module docstring for the binding rule."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def entry_path(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"{key!r} is not a cache key (64 lowercase hex digits from cache_key)")
        return self.root / f"{key}.entry"

    def _read(self, key: str) -> _Entry:
        path = self.entry_path(key)
        try:
            if path.exists() and not path.is_file():  # a FIFO would block the read forever
                raise _Miss("the entry is not a regular file")
            blob = path.read_bytes()
        except FileNotFoundError:
            raise _Miss("no entry for this key") from None
        except OSError as e:
            raise _Miss(f"the entry cannot be read ({e.strerror or type(e).__name__})") from None
        try:
            return _unpack(key, blob)
        except _Miss:
            raise
        except Exception as e:  # JSON, a missing field: a damaged entry whose digest was forged
            raise _Miss(f"the entry cannot be parsed ({type(e).__name__}: {e})") from None

    def store(self, key: str, graph: str | os.PathLike[str], state: Mapping[str, Tensor]) -> Outcome:
        """Record the fresh export at `graph` (with its external data) of a model whose state dict is `state`.
        The first export of a key is kept as a witness; a second that agrees makes the entry bindable. An export
        that disagrees with the entry (a constant computed from the weights, a graph that changed) starts the
        entry again from this export, and says what differed, unless the entry is bindable and would not have
        bound these weights (a zero bias the exporter drops): the entry stands, as nothing contradicts it."""
        graph, why = Path(graph), ""
        try:
            old: _Entry | None = self._read(key)
        except _Miss as e:
            old, why = None, str(e)
        prefer = _recipe(old.header) if old is not None else {}
        try:
            new = _take_apart(graph, state, prefer)
        except _Miss as e:
            return Outcome(reason=f"not stored: {e}")
        except Exception as e:
            log.debug("export cache: taking %s apart failed", graph, exc_info=True)
            return Outcome(reason=f"not stored: {graph} cannot be read ({type(e).__name__}: {e})")
        unused = new.header["unused"]
        note = f"; {len(unused)} state tensor(s) bound to no initializer: {', '.join(unused[:3])}" if unused else ""
        if old is not None and (differs := _disagreement(old, new)) is None:
            varied = [n for n, s in new.header["state"].items() if s["sha256"] != old.header["state"][n]["sha256"]]
            header = {**old.header, "witnesses": old.header["witnesses"] + 1}
            header["state"] = {n: {**s, "varied": s["varied"] or n in varied} for n, s in old.header["state"].items()}
            entry, written = _Entry(header=header, skeleton=old.skeleton, consts=old.consts), True
            count, total = sum(s["varied"] for s in header["state"].values()), len(header["state"])
            reason = (
                f"stored: {header['witnesses']} exports agree; {count} of {total} state tensors may differ from the "
                f"first export's when binding, {total - count} must equal it{note}"
            )
        elif old is None:
            entry, written = new, False
            reason = f"kept as the first export of this key ({why}); it binds once a second export agrees{note}"
        elif (outside := _outside(old.header, state)) is not None:
            return Outcome(reason=f"not stored: this export disagrees with the entry ({differs}) but {outside}")
        else:
            entry, written = new, False
            if old.header["witnesses"] > 1:
                log.warning("export cache: entry %s would have bound other weights wrongly (%s)", key[:12], differs)
            reason = f"this export disagrees with the entry ({differs}); the entry starts again from it{note}"
        try:
            publish.remove_stale_in(self.root, lambda n: n == f"{key}.entry", self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.entry_path(key)
            blob = _pack(key, entry)
            os.replace(_write_temp(path, lambda f: _write_pieces(f, blob), durable=True), path)
        except OSError as e:
            return Outcome(reason=f"not stored: cannot write the entry ({e.strerror or type(e).__name__})")
        return Outcome(stored=written, reason=reason)

    def bind(self, key: str, state: Mapping[str, Tensor], dest: str | os.PathLike[str]) -> Outcome:
        """Write `dest` and `<dest name>.data`: the entry's graph with `state` put through its recipe, as a fresh
        export of a model holding `state` would be. A miss (with the reason) writes nothing."""
        dest = Path(dest)
        try:
            entry = self._read(key)
            bound = _check(entry.header, state)
            _write_bound(entry, state, dest)
        except _Miss as e:
            return Outcome(reason=str(e))
        except Exception as e:
            log.debug("export cache: binding %s failed", key, exc_info=True)
            return Outcome(reason=f"the entry cannot be bound ({type(e).__name__}: {e})")
        h = entry.header
        return Outcome(hit=True, reason=f"bound {bound} initializers from an entry {h['witnesses']} exports agree on")


def _outside(header: Mapping[str, Any], state: Mapping[str, Tensor]) -> str | None:
    """Why a bindable entry would not bind `state`, so an export of it that disagrees does not contradict the
    entry; None when the entry would bind it (or is not bindable yet)."""
    if header["witnesses"] < 2:
        return None
    try:
        _check(header, state)
    except _Miss as e:
        return f"the entry would not bind its weights ({e}); the entry is kept"
    return None


def _check(header: Mapping[str, Any], state: Mapping[str, Tensor]) -> int:
    """Raise `_Miss` unless the entry may bind `state` (rules 1-3); returns how many initializers it binds."""
    if header["witnesses"] < 2:
        raise _Miss("the entry has seen one export; a second that agrees with it makes it bindable")
    spec = header["state"]
    missing, extra = sorted(set(spec) - set(state)), sorted(set(state) - set(spec))
    if missing or extra:
        raise _Miss(f"the state does not fit the entry: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, s in spec.items():
        t = state[name]
        if _dtype_name(t.dtype) != s["dtype"] or list(t.shape) != s["shape"]:
            raise _Miss(f"{name} is {_dtype_name(t.dtype)}{list(t.shape)}, the entry's is {s['dtype']}{s['shape']}")
        if not s["varied"] and _sha256(_bytes(t)) != s["sha256"]:
            raise _Miss(
                f"{name} differs from the weights of the entry's exports, and no export has shown that the graph "
                "does not depend on its values (storing this export will)"
            )
    sources = list(_recipe(header).values())
    seen: dict[Any, str] = {(d, n, sha): f"constant {label}" for d, n, sha, label in header["marks"]}
    for source, perm in sources:
        t = state[source].detach().cpu()
        if _special(t):
            raise _Miss(f"{source} is uniform or a scalar 0/±1, which the exporter rewrites: a fresh export differs")
        if t.numel() <= _DEDUP_CHECK:
            mark, what = (_dtype_name(t.dtype), t.numel(), _sha256(_bytes(t, perm))), f"{source} {perm or ''}"
            if seen.setdefault(mark, what) != what:
                raise _Miss(f"{source} equals {seen[mark]}: a fresh export would share one initializer for both")
    return len(sources)


def _write_bound(entry: _Entry, state: Mapping[str, Tensor], dest: Path) -> None:
    import onnx

    header = entry.header
    model = onnx.ModelProto()
    model.ParseFromString(entry.skeleton)
    data_name = f"{dest.name}.data"
    for label, tensor, top in _all_tensors(model):
        if _external(tensor) is not None:
            _set_location(tensor, data_name)
        elif top and tensor.name in header["inline"]:
            source, perm = header["inline"][tensor.name]
            tensor.raw_data = bytes(_bytes(state[source], perm))
        elif label not in header["constants"]:
            raise _Miss(f"the entry's graph has a tensor {label} its header does not account for")

    def fill_data(f: BinaryIO) -> None:
        end = 0
        for s in header["segments"]:
            if s["offset"] < end:
                raise _Miss("the entry's data layout overlaps")
            f.write(bytes(s["offset"] - end))
            if "state" in s:
                piece: memoryview | bytes = _bytes(state[s["state"]], s["perm"])
            else:
                piece = entry.consts[s["const"] : s["const"] + s["length"]]
            if len(piece) != s["length"]:
                raise _Miss(f"a segment at offset {s['offset']} has {len(piece)} bytes, the entry says {s['length']}")
            _write_pieces(f, piece)
            end = s["offset"] + s["length"]
        f.write(bytes(header["data_bytes"] - end))

    dest.parent.mkdir(parents=True, exist_ok=True)
    publish.remove_stale_in(dest.parent, lambda n: n in (dest.name, data_name), dest.parent)
    data_tmp = _write_temp(dest.parent / data_name, fill_data, durable=False) if header["segments"] else None
    try:
        blob = model.SerializeToString()
        graph_tmp = _write_temp(dest, lambda f: _write_pieces(f, blob), durable=False)
    except BaseException:
        if data_tmp is not None:
            data_tmp.unlink(missing_ok=True)
        raise
    if data_tmp is not None:
        os.replace(data_tmp, dest.parent / data_name)
    os.replace(graph_tmp, dest)
