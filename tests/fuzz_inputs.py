"""Seeds and hypothesis strategies for the loader fuzz tests (tests/test_fuzz.py).

Seeds are small valid checkpoints built here: a safetensors file with a one-block timm ViT (so `describe` finds
a stack) and a paired λ (so it reads floats), the same tensors as two shards plus an index, a `torch.save` zip
and a legacy pickle. Strategies turn a seed into a `Mutant`: the mutated bytes plus the steps that made them,
so a failing example reads as what was done, not as kilobytes of bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import zipfile
from dataclasses import dataclass, field
from functools import cache

import torch
from families import stack, timm_block
from hypothesis import strategies as st
from safetensors.torch import save

OUTSIDE = "outside.safetensors"  # a valid file beside the shard folder, for `../` and absolute weight_map entries
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Mutant:
    data: bytes
    steps: tuple[str, ...]
    suffix: str = ".safetensors"
    files: dict[str, bytes] = field(default_factory=dict)  # extra files of a sharded set, by name

    def __repr__(self) -> str:
        return f"Mutant({self.suffix}, {list(self.steps)})"

    def _repr_pretty_(self, p: object, cycle: bool) -> None:  # hypothesis prints the steps, not the bytes
        p.text(repr(self))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: literals Python's json would never write (1e400, a 5,000-digit int, a lone
    surrogate escape) and deep nesting."""

    text: str


@dataclass
class Obj:
    """A JSON object as a list of pairs, so a key can appear twice."""

    pairs: list[list[object]]


def dump(v: object) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Obj):
        return "{" + ",".join(f"{dump(k)}:{dump(x)}" for k, x in v.pairs) + "}"
    if isinstance(v, dict):
        return dump(Obj([[k, x] for k, x in v.items()]))
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


# --- seeds ------------------------------------------------------------------------------------------------------


@cache
def seed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    sd = stack("blocks", 1, timm_block(d=4, h=8))
    return sd | {
        "blocks.0.attn.proj.aux_weight": torch.randn(4, 4, generator=g),
        "blocks.0.attn.proj.cross_modal_scale": torch.tensor([0.25]),
        "cls_token": torch.randn(1, 1, 4, generator=g).to(torch.bfloat16),
        "pos_embed": torch.randn(1, 2, 4, generator=g).half(),
        "pos_ids": torch.arange(3),
        "mask": torch.tensor([True, False]),
        "scale": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


@cache
def seed_safetensors() -> bytes:
    return save(seed_tensors(), metadata={"format": "pt", "who": "fuzz"})


@cache
def seed_shards() -> dict[str, bytes]:
    sd = seed_tensors()
    first = {k: v for k, v in sd.items() if k.startswith("blocks.")}
    rest = {k: v for k, v in sd.items() if k not in first}
    weight_map = {k: SHARDS[0] for k in first} | {k: SHARDS[1] for k in rest}
    index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
    return {SHARDS[0]: save(first), SHARDS[1]: save(rest), INDEX: json.dumps(index, indent=2).encode()}


@cache
def seed_zip_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": seed_tensors(), "epoch": 3, "args": argparse.Namespace(lr=0.1)}, buf)
    return buf.getvalue()


@cache
def seed_legacy_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": seed_tensors(), "step": 10}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def split_safetensors(data: bytes) -> tuple[dict[str, object], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + body


# --- JSON values --------------------------------------------------------------------------------------------------

SPECIAL = [
    Raw("1e400"),
    Raw("-1e400"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("NaN"),
    Raw("9" * 5000),
    Raw("1" + "0" * 25),
    Raw("2.0"),
    Raw("-0"),
    Raw("1E2"),
    Raw('"\\ud800"'),
]
INTS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(0, 64),
    st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, 10**18]),
)
ATOMS = st.one_of(
    INTS,
    st.floats(),
    st.sampled_from(SPECIAL),
    st.text(max_size=6),
    st.sampled_from(["2", "16", "F32", "I64", "", "__metadata__"]),
    st.booleans(),
    st.none(),
)
VALUES = st.recursive(
    ATOMS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=8
)
DTYPES = st.sampled_from(
    ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E8M0", "C64", "F4", "f32", "x"]
)
OVERFLOWING = st.lists(st.sampled_from([0, 1, 2**32, 2**62, 2**63, 2**64 - 1]), min_size=2, max_size=40)
FIELD_VALUES = {
    "dtype": st.one_of(DTYPES, VALUES),
    "shape": st.one_of(st.lists(INTS, max_size=5), OVERFLOWING, VALUES),
    "data_offsets": st.one_of(st.lists(INTS, min_size=2, max_size=2), st.lists(INTS, max_size=3), VALUES),
}
NAMES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", "__metadata__", "module.x", "_orig_mod.module.x", "blocks.0.attn.qkv.weight"]),
    st.sampled_from(["blocks." + "9" * 5000 + ".attn.qkv.weight", "blocks.99999999999.attn.qkv.weight"]),
)
KEYS = st.one_of(NAMES, st.just(Raw('"\\udc80name"')))
NESTING = st.sampled_from([2, 60, 1_000, 100_000])


def nest(depth: int, inner: object, kind: str) -> Raw:
    if kind == "[":
        return Raw("[" * depth + dump(inner) + "]" * depth)
    return Raw('{"a":' * depth + dump(inner) + "}" * depth)


def short(v: object) -> str:
    text = dump(v) if not isinstance(v, str) else repr(v)
    return text if len(text) < 60 else text[:40] + f"...({len(text)} chars)"


# --- safetensors header edits ----------------------------------------------------------------------------------

_SAME_SIZE = [("F32", "I32", "U32"), ("F16", "BF16", "I16", "U16"), ("U8", "I8", "BOOL", "F8_E4M3"), ("F64", "I64")]


def _entries(pairs: list[list[object]]) -> list[int]:
    return [i for i, (k, v) in enumerate(pairs) if k != "__metadata__" and isinstance(v, dict)]


def edit_header(draw: st.DrawFn, pairs: list[list[object]]) -> str:
    """Apply one drawn edit to the header `pairs` in place; return what was done."""
    entries = _entries(pairs)
    op = draw(st.sampled_from(["field", "element", "consistent", "key", "entry", "metadata", "nest"]))
    if not entries:
        op = "metadata"
    i = draw(st.sampled_from(entries)) if entries else 0
    key, spec = pairs[i] if entries else (None, {})
    if op == "field":
        name = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        how = draw(st.sampled_from(["set", "set", "drop", "extra"]))
        if how == "drop":
            spec.pop(name, None)
            return f"{short(key)}: drop {name}"
        if how == "extra":
            spec[draw(st.text(max_size=4))] = draw(VALUES)
            return f"{short(key)}: extra field"
        spec[name] = draw(FIELD_VALUES[name])
        return f"{short(key)}.{name} = {short(spec[name])}"
    if op == "element":
        name = draw(st.sampled_from(["shape", "data_offsets"]))
        seq = spec.get(name)
        if isinstance(seq, list) and seq:
            j = draw(st.integers(0, len(seq) - 1))
            seq[j] = draw(st.one_of(ATOMS, INTS))
            return f"{short(key)}.{name}[{j}] = {short(seq[j])}"
        return "no-op"
    if op == "consistent":  # edits safetensors accepts: the read must still match it
        how = draw(st.sampled_from(["reshape", "dtype", "swap", "empty"]))
        empty = [k for k, v in pairs if isinstance(v, dict) and v.get("shape") == [0, 4]]
        if how == "empty" and empty:  # any shape with a 0 holds no bytes, however large its other dimensions
            spec = next(v for k, v in pairs if k == empty[0])
            spec["shape"] = draw(st.permutations([0, *draw(st.lists(INTS, max_size=3))]))
            return f"{short(empty[0])}.shape = {short(spec['shape'])}"
        if how == "reshape" and isinstance(spec.get("shape"), list):
            spec["shape"] = draw(st.sampled_from([[1, *spec["shape"]], [*spec["shape"], 1], spec["shape"][::-1]]))
            return f"{short(key)}.shape = {spec['shape']}"
        if (
            how == "dtype"
            and isinstance(spec.get("dtype"), str)
            and spec["dtype"] in {c for g in _SAME_SIZE for c in g}
        ):
            spec["dtype"] = draw(st.sampled_from(next(g for g in _SAME_SIZE if spec["dtype"] in g)))
            return f"{short(key)}.dtype = {spec['dtype']}"
        j = draw(st.sampled_from(entries))
        other = pairs[j][1]
        spec["data_offsets"], other["data_offsets"] = other.get("data_offsets"), spec.get("data_offsets")
        return f"swap data_offsets of {short(key)} and {short(pairs[j][0])}"
    if op == "key":
        how = draw(st.sampled_from(["rename", "duplicate", "drop"]))
        if how == "drop":
            del pairs[i]
            return f"drop {short(key)}"
        new = draw(KEYS)
        if how == "duplicate":
            pairs.insert(draw(st.integers(0, len(pairs))), [new, dict(spec)])
            return f"duplicate {short(key)} as {short(new)}"
        pairs[i][0] = new
        return f"rename {short(key)} -> {short(new)}"
    if op == "entry":
        pairs[i][1] = draw(VALUES)
        return f"{short(key)} = {short(pairs[i][1])}"
    if op == "nest":
        name = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        spec[name] = nest(draw(NESTING), spec.get(name), draw(st.sampled_from("[{")))
        return f"{short(key)}.{name} nested {spec[name].text.count('[') or spec[name].text.count('{')} deep"
    meta = draw(
        st.one_of(
            VALUES,
            st.dictionaries(st.text(max_size=3), VALUES, max_size=2),
            st.builds(nest, NESTING, ATOMS, st.just("[")),
        )
    )
    md = next((p for p in pairs if p[0] == "__metadata__"), None)
    if md is None:
        pairs.insert(0, ["__metadata__", meta])
    else:
        md[1] = meta
    return f"__metadata__ = {short(meta)}"


@st.composite
def header_mutants(draw: st.DrawFn, seed: bytes | None = None) -> Mutant:
    """JSON-level edits of a safetensors header; the length field is rewritten to match, the data kept."""
    seed = seed or seed_safetensors()
    header, body = split_safetensors(seed)
    pairs = [[k, dict(v) if isinstance(v, dict) else v] for k, v in header.items()]
    steps = [edit_header(draw, pairs) for _ in range(draw(st.integers(1, 3)))]
    text = dump(Obj(pairs))
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.sampled_from([dump(draw(VALUES)), " " + text, text + " " * 7, "\ufeff" + text, text + "x"]))
        steps.append(f"header text -> {short(text)}")
    return Mutant(join_safetensors(text, body), tuple(steps))


@st.composite
def byte_mutants(draw: st.DrawFn, seed: bytes, hot: tuple[int, int], suffix: str) -> Mutant:
    """Byte flips (mostly in `hot`, the header or the zip directory), truncation, insertion and deletion."""
    data = bytearray(seed)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "delete", "length"]))
        lo, hi = hot if draw(st.integers(0, 4)) else (0, len(data))
        hi = min(hi, len(data))
        if not data or lo >= hi:
            break
        at = draw(st.integers(lo, hi - 1))
        if op == "flip":
            bit = draw(st.integers(1, 255))
            data[at] ^= bit
            steps.append(f"flip byte {at} ^ {bit}")
        elif op == "truncate":
            del data[at:]
            steps.append(f"truncate to {at}")
        elif op == "insert":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at] = chunk
            steps.append(f"insert {chunk!r} at {at}")
        elif op == "delete":
            n = draw(st.integers(1, 16))
            del data[at : at + n]
            steps.append(f"delete {n} at {at}")
        elif suffix == ".safetensors" and len(data) >= 8:
            (n,) = struct.unpack("<Q", data[:8])
            size = draw(st.sampled_from([0, 1, 7, n - 1, n + 1, n + 8, len(data), 2**64 - 1, 100 * 2**20 + 1]))
            data[:8] = struct.pack("<Q", size % 2**64)
            steps.append(f"header length = {size % 2**64}")
    return Mutant(bytes(data), tuple(steps), suffix)


def safetensors_mutants() -> st.SearchStrategy[Mutant]:
    seed = seed_safetensors()
    (n,) = struct.unpack("<Q", seed[:8])
    return st.one_of(header_mutants(), byte_mutants(seed, (0, 8 + n), ".safetensors"))


# --- shard index edits -----------------------------------------------------------------------------------------

PATHS = st.sampled_from(
    [
        *(f"../{OUTSIDE}", "/OUTSIDE", "", ".", "..", SHARDS[1], f"./{SHARDS[0]}", f"sub/../{SHARDS[0]}", INDEX),
        *("missing.safetensors", f"{SHARDS[0]}\x00", "/dev/zero", "/proc/self/mem", "//etc/passwd"),
    ]
)


@st.composite
def index_mutants(draw: st.DrawFn) -> Mutant:
    """Edits of `model.safetensors.index.json` (weight_map values, paths, keys, nesting) and of one shard."""
    files = dict(seed_shards())
    index = json.loads(files[INDEX])
    wm: dict[str, object] = index["weight_map"]
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["value", "path", "drop", "add", "weight_map", "top", "shard", "nest"]))
        name = draw(st.sampled_from(sorted(wm))) if wm else "x"
        if op == "value":
            wm[name] = draw(VALUES)
            steps.append(f"weight_map[{name!r}] = {short(wm[name])}")
        elif op == "path":
            wm[name] = draw(PATHS)
            steps.append(f"weight_map[{name!r}] = {wm[name]!r}")
        elif op == "drop":
            wm.pop(name, None)
            steps.append(f"drop weight_map[{name!r}]")
        elif op == "add":
            new = draw(NAMES)
            wm[new] = draw(st.sampled_from(SHARDS))
            steps.append(f"weight_map[{short(new)}] = {wm[new]!r}")
        elif op == "weight_map" and isinstance(index, dict):
            index["weight_map"] = wm = draw(VALUES) if draw(st.booleans()) else {}
            wm = wm if isinstance(wm, dict) else {}
            steps.append(f"weight_map = {short(index['weight_map'])}")
        elif op in ("top", "weight_map"):
            index = draw(VALUES)
            wm = {}
            steps.append(f"index = {short(index)}")
        elif op == "nest":
            wm[name] = nest(draw(NESTING), SHARDS[0], "[")
            steps.append(f"weight_map[{name!r}] nested")
        else:
            shard = draw(st.sampled_from(SHARDS))
            seed = seed_shards()[shard]
            (n,) = struct.unpack("<Q", seed[:8])
            m = draw(st.one_of(header_mutants(seed), byte_mutants(seed, (0, 8 + n), ".safetensors")))
            files[shard] = m.data
            steps.append(f"{shard}: {list(m.steps)}")
    text = dump(index)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
        steps.append(f"index truncated to {len(text)} chars")
    files[INDEX] = text.encode("utf-8", "surrogatepass")
    return Mutant(files[INDEX], tuple(steps), ".json", files)


# --- pickles -----------------------------------------------------------------------------------------------------


def data_start(raw: bytes, info: zipfile.ZipInfo) -> int:
    n, m = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + n + m


@st.composite
def zip_member_mutants(draw: st.DrawFn) -> Mutant:
    """Rebuild the zip with one member changed: a storage record cut short or grown, data.pkl flipped or cut,
    a member dropped, renamed or compressed."""
    seed = seed_zip_pickle()
    src = zipfile.ZipFile(io.BytesIO(seed))
    infos = src.infolist()
    target = draw(st.sampled_from([i.filename for i in infos]))
    op = draw(st.sampled_from(["cut", "grow", "flip", "drop", "rename", "deflate"]))
    out = io.BytesIO()
    step = f"{target}: {op}"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in infos:
            data = src.read(info.filename)
            if info.filename == target:
                if op == "cut":
                    k = draw(st.integers(0, max(0, len(data) - 1)))
                    data, step = data[:k], f"{target}: cut to {k} of {len(data)} bytes"
                elif op == "grow":
                    data += draw(st.binary(min_size=1, max_size=64))
                elif op == "flip" and data:
                    at, bit = draw(st.integers(0, len(data) - 1)), draw(st.integers(1, 255))
                    data = data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]
                    step = f"{target}: flip byte {at} ^ {bit}"
                elif op == "drop":
                    continue
                elif op == "rename":
                    info = zipfile.ZipInfo(draw(st.sampled_from(["x", target + "x", "z/data/99", "z/data.pkl"])))
                elif op == "deflate":
                    info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
    return Mutant(out.getvalue(), (step,), ".pt")


def zip_mutants() -> st.SearchStrategy[Mutant]:
    seed = seed_zip_pickle()
    z = zipfile.ZipFile(io.BytesIO(seed))
    pkl = z.getinfo(next(n for n in z.namelist() if n.endswith("data.pkl")))
    directory = z.start_dir  # the central directory, then the end record
    start = data_start(seed, pkl)
    return st.one_of(
        zip_member_mutants(),
        byte_mutants(seed, (start, start + pkl.file_size), ".pt"),  # the pickle stream itself
        byte_mutants(seed, (directory, len(seed)), ".pt"),
    )


def legacy_mutants() -> st.SearchStrategy[Mutant]:
    seed = seed_legacy_pickle()
    return byte_mutants(seed, (0, len(seed)), ".pth")
