"""Structure detection: names and shapes of a checkpoint → its transformer block stacks and linear roles.

Works on `TensorInfo` (name, dtype, shape) only, so it never reads a tensor.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from mmsurgery.checkpoint.dtypes import FLOATING
from mmsurgery.checkpoint.loaded import TensorInfo
from mmsurgery.errors import NoTransformerBlocksError
from mmsurgery.layout.families import (
    DECODER_MARKER,
    EMA_MARKER,
    FAMILIES,
    GATED_ROLE,
    PAIRABLE_ROLES,
    ROLES,
    Family,
    containers,
)

__all__ = ["BY_SHAPE", "Block", "Layout", "Linear", "Stack", "choose_stack", "default_stack", "detect"]

BY_SHAPE = "by-shape"  # the family name reported when names said nothing and shapes decided
# A block index has at most 9 digits: a longer run of digits is part of a name, not a block (and `int()` of
# thousands of digits would raise).
_STACK = re.compile(
    r"^(?P<stack>(?:.*?\.)?(?:" + "|".join(map(re.escape, containers())) + r"))\.(?P<idx>\d{1,9})\.(?P<rest>.+)$"
)
_CHUNKED = re.compile(r"^(?P<idx>\d{1,9})\.(?P<rest>.+)$")  # DINOv2 BlockChunk: blocks.<chunk>.<global idx>.<rest>


@dataclass(frozen=True)
class Linear:
    role: str
    key: str  # the weight's (normalised) name
    shape: tuple[int, ...]  # as stored; Conv1D stores [in, out]
    out_features: int
    in_features: int
    bias: str | None  # the bias key, when the checkpoint has one
    dtype: str

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "shape": list(self.shape), "bias": self.bias is not None, "dtype": self.dtype}


@dataclass(frozen=True)
class Block:
    index: int
    prefix: str  # the key prefix of this block, e.g. "blocks.3." (or "blocks.1.3." when chunked)
    linears: tuple[Linear, ...]

    def get(self, role: str) -> Linear | None:
        return next((lin for lin in self.linears if lin.role == role), None)


@dataclass(frozen=True)
class Stack:
    prefix: str
    family: str
    depth: int
    width: int | None
    mlp_width: int | None
    qkv: str  # "fused", "split" or "none"
    norm: str  # "pre", "post" or "unknown"
    orientation: str  # "linear" or "conv1d"
    bias: str  # "all", "none" or "partial": do the block linears carry biases
    decoder: bool
    ema: bool
    gated_mlp: bool
    num_params: int
    blocks: tuple[Block, ...]
    notes: tuple[str, ...] = ()

    @property
    def pairable(self) -> bool:
        return not (self.decoder or self.ema)

    def to_json(self) -> dict[str, object]:
        return {
            "prefix": self.prefix,
            "family": self.family,
            "depth": self.depth,
            "width": self.width,
            "mlp_width": self.mlp_width,
            "qkv": self.qkv,
            "norm": self.norm,
            "orientation": self.orientation,
            "bias": self.bias,
            "decoder": self.decoder,
            "ema": self.ema,
            "gated_mlp": self.gated_mlp,
            "num_params": self.num_params,
            "notes": list(self.notes),
            "blocks": [
                {"index": b.index, "roles": {lin.role: lin.to_json() for lin in b.linears}} for b in self.blocks
            ],
        }


@dataclass(frozen=True)
class Layout:
    stacks: tuple[Stack, ...]
    other: dict[str, tuple[int, int]]  # non-block tensors grouped by first name segment: (tensors, params)

    def stack(self, prefix: str) -> Stack:
        for s in self.stacks:
            if s.prefix == prefix:
                return s
        have = ", ".join(s.prefix for s in self.stacks) or "none"
        raise NoTransformerBlocksError(f"no block stack {prefix!r} (stacks: {have})")


def detect(infos: Mapping[str, TensorInfo]) -> Layout:
    """Find every transformer block stack and classify each block's linears."""
    grouped: dict[str, dict[int, dict[str, TensorInfo]]] = defaultdict(lambda: defaultdict(dict))
    prefixes: dict[tuple[str, int], str] = {}
    other: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, info in infos.items():
        m = _STACK.match(name)
        if m:
            stack, idx, rest = m["stack"], int(m["idx"]), m["rest"]
            chunk = _CHUNKED.match(rest)
            if chunk and stack.rsplit(".", 1)[-1] == "blocks":
                idx, rest = int(chunk["idx"]), chunk["rest"]
            grouped[stack][idx][rest] = info
            prefixes[(stack, idx)] = name[: len(name) - len(rest)]
        else:
            g = other[name.split(".", 1)[0]]
            g[0] += 1
            g[1] += info.numel if info.dtype in FLOATING else 0
    stacks = []
    for prefix, blocks in grouped.items():
        s = _build_stack(prefix, blocks, prefixes)
        if s is None:  # a container name, but no transformer linears inside (e.g. a conv net's `layer.0`)
            for block in blocks.values():
                for rest, info in block.items():
                    g = other[(prefix + "." + rest).split(".", 1)[0]]
                    g[0] += 1
                    g[1] += info.numel if info.dtype in FLOATING else 0
            continue
        stacks.append(s)
    return Layout(tuple(stacks), {k: (v[0], v[1]) for k, v in other.items()})


def _build_stack(
    prefix: str, blocks: Mapping[int, Mapping[str, TensorInfo]], prefixes: Mapping[tuple[str, int], str]
) -> Stack | None:
    fam = _best_family(prefix, blocks)
    notes: list[str] = []
    built = []
    for idx in sorted(blocks):
        tensors = blocks[idx]
        linears = _classify(fam, tensors) if fam else _classify_by_shape(tensors)
        built.append(Block(idx, prefixes[(prefix, idx)], tuple(linears)))
    if not any(b.linears for b in built):
        return None
    orientation = fam.orientation if fam else "linear"
    width = _width(built[0], blocks[min(blocks)])
    up, down = built[0].get("mlp_in"), built[0].get("mlp_out")
    mlp_width = down.in_features if down else up.out_features if up else None
    gated = any(lin.role == GATED_ROLE for b in built for lin in b.linears) or _packed_glu(built[0])
    if gated:
        built = [_retag_gated(b) for b in built]
        notes.append("gated MLP: its linears are not pairable with a plain GELU MLP")
    mlp_in = built[0].get("mlp_in")  # None for a gated MLP
    roles = {lin.role for b in built for lin in b.linears}
    qkv = "fused" if "qkv" in roles else "split" if {"q", "k", "v"} & roles else "none"
    pairable = [lin for b in built for lin in b.linears if lin.role in PAIRABLE_ROLES]
    with_bias = sum(lin.bias is not None for lin in pairable)
    bias = "all" if with_bias == len(pairable) else "none" if with_bias == 0 else "partial"
    indices = sorted(blocks)
    if indices != list(range(len(indices))):
        notes.append(f"block indices are not contiguous from 0: {indices[:8]}")
    if fam is None:
        notes.append("no known family matched the names: roles were assigned by shape")
    if orientation == "conv1d" and mlp_in and width and mlp_in.shape[0] != width:
        notes.append(f"Conv1D orientation expected mlp.c_fc [D, H], found {list(mlp_in.shape)}")
    num_params = sum(i.numel for b in blocks.values() for i in b.values() if i.dtype in FLOATING)
    return Stack(
        prefix=prefix,
        family=fam.name if fam else BY_SHAPE,
        depth=len(blocks),
        width=width,
        mlp_width=mlp_width,
        qkv=qkv,
        norm=fam.norm if fam else "unknown",
        orientation=orientation,
        bias=bias,
        decoder=bool(DECODER_MARKER.search(prefix)),
        ema=bool(EMA_MARKER.search(prefix)),
        gated_mlp=gated,
        num_params=num_params,
        blocks=tuple(built),
        notes=tuple(notes),
    )


def _best_family(prefix: str, blocks: Mapping[int, Mapping[str, TensorInfo]]) -> Family | None:
    container = prefix.rsplit(".", 1)[-1]
    scores: Counter[str] = Counter()
    for fam in FAMILIES:
        if container in fam.containers:
            scores[fam.name] = sum(fam.role_of(rest) is not None for b in blocks.values() for rest in b)
    best = max(scores.values(), default=0)
    if best == 0:
        return None
    return next(f for f in FAMILIES if scores.get(f.name) == best)


def _linear(role: str, key_rest: str, info: TensorInfo, tensors: Mapping[str, TensorInfo], conv1d: bool) -> Linear:
    a, b = info.shape
    out_f, in_f = (b, a) if conv1d else (a, b)
    bias_rest = key_rest[: -len("weight")] + "bias"
    bias = info.name[: len(info.name) - len(key_rest)] + bias_rest if bias_rest in tensors else None
    return Linear(role, info.name, info.shape, out_f, in_f, bias, info.dtype)


def _classify(fam: Family, tensors: Mapping[str, TensorInfo]) -> list[Linear]:
    found = []
    for rest, info in tensors.items():
        role = fam.role_of(rest)
        if role is not None and len(info.shape) == 2:
            found.append(_linear(role, rest, info, tensors, fam.orientation == "conv1d"))
    return sorted(found, key=lambda lin: (ROLES.index(lin.role), lin.key))


def _classify_by_shape(tensors: Mapping[str, TensorInfo]) -> list[Linear]:
    """Names say nothing: `[3D, D]` is a fused qkv; one `[H, D]` with one `[D, H]` is the MLP. Square
    matrices are ambiguous (q? k? out?) and are left alone: never guess from tensor order."""
    ones = Counter(i.shape[0] for i in tensors.values() if len(i.shape) == 1)
    if not ones:
        return []
    d = ones.most_common(1)[0][0]
    mats = {rest: i for rest, i in tensors.items() if len(i.shape) == 2 and rest.endswith("weight")}
    found = [_linear("qkv", r, i, tensors, False) for r, i in mats.items() if i.shape == (3 * d, d)]
    ups = [(r, i) for r, i in mats.items() if i.shape[1] == d and i.shape[0] not in (d, 3 * d)]
    downs = [(r, i) for r, i in mats.items() if i.shape[0] == d and i.shape[1] not in (d, 3 * d)]
    if len(ups) == 1 and len(downs) == 1 and ups[0][1].shape[0] == downs[0][1].shape[1]:
        found.append(_linear("mlp_in", *ups[0], tensors, False))
        found.append(_linear("mlp_out", *downs[0], tensors, False))
    return found if len(found) <= 3 else []


def _width(block: Block, tensors: Mapping[str, TensorInfo]) -> int | None:
    for role, div in (("attn_out", 1), ("q", 1), ("qkv", 3), ("mlp_out", 1)):
        lin = block.get(role)
        if lin is not None:
            return lin.out_features // div
    ones = Counter(i.shape[0] for i in tensors.values() if len(i.shape) == 1)
    return ones.most_common(1)[0][0] if ones else None


def _packed_glu(block: Block) -> bool:
    """timm GluMlp / EVA02-S pack gate and value into one `fc1` of twice the hidden width."""
    up, down = block.get("mlp_in"), block.get("mlp_out")
    return bool(up and down and up.out_features == 2 * down.in_features)


def _retag_gated(block: Block) -> Block:
    """A block with a gated (GLU) MLP: its MLP linears, including a packed `fc1`, are all `mlp_gated`."""
    out = []
    for lin in block.linears:
        if lin.role in ("mlp_in", "mlp_out"):
            lin = Linear(GATED_ROLE, lin.key, lin.shape, lin.out_features, lin.in_features, lin.bias, lin.dtype)
        out.append(lin)
    return Block(block.index, block.prefix, tuple(out))


def default_stack(layout: Layout) -> Stack | None:
    """The stack a command works on when none is named: the largest that is neither a decoder nor an EMA copy;
    None when two candidates are within 10% of each other in size (CLIP's vision and text towers)."""
    candidates = sorted((s for s in layout.stacks if s.pairable), key=lambda s: -s.num_params)
    if not candidates or (len(candidates) > 1 and candidates[1].num_params >= 0.9 * candidates[0].num_params):
        return None
    return candidates[0]


def choose_stack(layout: Layout, prefix: str | None = None, *, what: str = "checkpoint") -> Stack:
    """`prefix` if given, else the default stack; a clear error when there is none or the choice is ambiguous."""
    if prefix is not None:
        return layout.stack(prefix)
    if not layout.stacks:
        raise NoTransformerBlocksError(f"{what}: no transformer blocks found (no stack of attention/MLP linears)")
    chosen = default_stack(layout)
    if chosen is None:
        listed = ", ".join(f"{s.prefix} ({s.depth} blocks, {s.num_params:,} params)" for s in layout.stacks)
        raise NoTransformerBlocksError(f"{what}: several candidate stacks, name one ({listed})")
    return chosen
