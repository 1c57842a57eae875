"""The paired-checkpoint contract, in one torch-free module that imports nothing of `pairing`.

Everything that names a pathway tensor, shapes λ, writes or reads the paired/folded metadata, finds the pathways
in a checkpoint or splits a paired state dict asks this module; docs/formats.md states the same contract.

A paired checkpoint holds every target tensor plus, per paired linear `P` and per auxiliary model `k`:

    k = 0:  P.aux_weight     P.cross_modal_scale      (M2PT's own names; a one-auxiliary file has only these)
    k ≥ 1:  P.aux_weight_k   P.cross_modal_scale_k    (a second, third... auxiliary)

`W_aux` is in the target's layout and dtype; λ is float32 and holds one value (M2PT's `[1]`, or `[]`), or one
value per block of W: per fused-qkv chunk or per output channel (`scale_shape`, `scale_problem`, `block_view`).
The merged weight is `W + Σₖ λₖ·W_auxₖ`, added left to right in float32 (`mmsurgery.foldmath`).

Every reader opens a paired checkpoint the same way: `open_paired(path)` (or `paired_view(ck)` over a checkpoint
already open) checks the format version, finds and validates the pathways and reads λ once, and gives a
`PairedCheckpoint`; `fold`, `describe`, `pathway.attach` and `verify` take that.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.errors import BadInputError, FoldError

__all__ = [
    "AUX_SHA256_KEY",
    "AUX_SUFFIX",
    "DEFAULT_ROLES",
    "DIGEST_CHARS",
    "FOLDED_FORMAT",
    "FOLDED_KIND",
    "FORMAT_KEY",
    "INIT_SCALE_KEY",
    "MAX_METADATA_JSON",
    "MAX_VERSION_DIGITS",
    "PAIRABLE_ROLES",
    "PAIRED_FORMAT",
    "PAIRED_KIND",
    "PENDING_DIGEST",
    "PLAN_KEY",
    "PLAN_SCHEMA",
    "SCALES_KEY",
    "SCALE_MODES",
    "SCALE_MODE_KEY",
    "SCALE_SUFFIX",
    "SOURCE_KEY",
    "TARGET_SHA256_KEY",
    "VERSION_KEY",
    "VIT_INFERRED",
    "VIT_KEY",
    "LayerScales",
    "PairedCheckpoint",
    "PathwayKey",
    "PathwaySpec",
    "aux_sha256_key",
    "aux_suffix",
    "aux_weight_key",
    "block_view",
    "check_format",
    "cross_modal_scale_key",
    "find_pathways",
    "folded_metadata",
    "group_pathway_keys",
    "is_pathway_key",
    "metadata_json",
    "missing_key",
    "module_of",
    "numbering_problem",
    "open_paired",
    "paired_format_value",
    "paired_metadata",
    "paired_view",
    "parse_key",
    "plan_key",
    "provenance_keys",
    "read_scales",
    "scale_entry",
    "scale_means",
    "scale_problem",
    "scale_shape",
    "scale_suffix",
    "scale_values",
    "split_paired",
    "weight_key",
]

# ---- key names ----------------------------------------------------------------------------------------------
AUX_SUFFIX = "aux_weight"  # M2PT's names: <linear>.aux_weight and <linear>.cross_modal_scale
SCALE_SUFFIX = "cross_modal_scale"
_KEY = re.compile(rf"^(?:(?P<module>.+)\.)?(?P<kind>{AUX_SUFFIX}|{SCALE_SUFFIX})(?:_(?P<index>[1-9][0-9]*))?$")


def aux_suffix(k: int = 0) -> str:
    return AUX_SUFFIX if k == 0 else f"{AUX_SUFFIX}_{k}"


def scale_suffix(k: int = 0) -> str:
    return SCALE_SUFFIX if k == 0 else f"{SCALE_SUFFIX}_{k}"


def aux_weight_key(module: str, k: int = 0) -> str:
    """`P.aux_weight` for the first auxiliary, `P.aux_weight_k` for the k-th (k ≥ 1, counted from 0)."""
    return f"{module}.{aux_suffix(k)}" if module else aux_suffix(k)


def cross_modal_scale_key(module: str, k: int = 0) -> str:
    return f"{module}.{scale_suffix(k)}" if module else scale_suffix(k)


@dataclass(frozen=True)
class PathwayKey:
    module: str  # the linear's module path ("" for a bare top-level key)
    kind: str  # "aux" or "scale"
    index: int  # which auxiliary, from 0


def parse_key(name: str) -> PathwayKey | None:
    """What a pathway tensor's name says, or None for any other key (`P.weight`, a bias, `aux_weight_0`...)."""
    m = _KEY.match(name)
    if m is None:
        return None
    kind = "aux" if m["kind"] == AUX_SUFFIX else "scale"
    return PathwayKey(m["module"] or "", kind, int(m["index"] or 0))


def is_pathway_key(name: str) -> bool:
    return parse_key(name) is not None


def group_pathway_keys(names: Iterable[str]) -> dict[str, dict[int, dict[str, str]]]:
    """The pathway keys among `names`, grouped: module path → auxiliary index → kind (`aux`, `scale`) → key, in
    name order. Other keys are left out; whether each group is complete is the caller's check (`numbering_problem`,
    `missing_key`: what `find_pathways` and `pathway.attach` check)."""
    groups: dict[str, dict[int, dict[str, str]]] = {}
    for name in names:
        key = parse_key(name)
        if key is not None:
            groups.setdefault(key.module, {}).setdefault(key.index, {})[key.kind] = name
    return groups


def numbering_problem(indices: Sequence[int]) -> str | None:
    """Why one linear's auxiliary indices (sorted, as `group_pathway_keys` found them) are not 0, 1, ... n-1 with
    no gap, or None."""
    if list(indices) != list(range(len(indices))):
        return f"auxiliaries numbered {list(indices)}; expected 0..{len(indices) - 1} with no gap"
    return None


def missing_key(k: int, kinds: Mapping[str, str]) -> str | None:
    """Which of auxiliary `k`'s two tensors (`aux_weight[_k]`, `cross_modal_scale[_k]`) one linear lacks, given its
    keys by kind (a `group_pathway_keys` entry), or None: a pathway has both or neither."""
    if "scale" not in kinds:
        return f"{aux_suffix(k)} without {scale_suffix(k)}"
    if "aux" not in kinds:
        return f"no {aux_suffix(k)}"
    return None


V = TypeVar("V")


def split_paired(state: Mapping[str, V]) -> tuple[dict[str, V], dict[str, V]]:
    """Split a paired state dict into (the plain model's keys, the pathway keys: every `aux_weight*` and
    `cross_modal_scale*`)."""
    plain: dict[str, V] = {}
    pathway: dict[str, V] = {}
    for key, value in state.items():
        (pathway if is_pathway_key(key) else plain)[key] = value
    return plain, pathway


# ---- a linear's own names ----------------------------------------------------------------------------------
def weight_key(module: str) -> str:
    """The weight tensor of the linear at module path `module`: `P` -> `P.weight` (`weight` at the top level)."""
    return f"{module}.weight" if module else "weight"


def module_of(weight: str) -> str:
    """The module that carries a pathway, from its weight's key: `blocks.0.attn.qkv.weight` -> `blocks.0.attn.qkv`
    (the inverse of `weight_key`)."""
    return "" if weight == "weight" else weight.removesuffix(".weight")


# The roles a linear plays in a block, as plans record them (`pairs[].role`): the four of the paper (q/k/v fused
# or split, attention output, MLP in and out). `qkv` asked for on a split target covers q, k and v.
PAIRABLE_ROLES: tuple[str, ...] = ("qkv", "q", "k", "v", "attn_out", "mlp_in", "mlp_out")
DEFAULT_ROLES: tuple[str, ...] = ("qkv", "attn_out", "mlp_in", "mlp_out")
PLAN_SCHEMA = "mmsurgery.plan/1"  # the plan's JSON (`mmsurgery.plan[.k]`, `pair --json`)


# ---- metadata -----------------------------------------------------------------------------------------------
FORMAT_KEY = "mmsurgery.format"  # "paired/1", "paired/2" or "folded/1"
VERSION_KEY = "mmsurgery.version"  # the mmsurgery that wrote the file
PLAN_KEY = "mmsurgery.plan"  # the pairing plan of auxiliary 0 (mmsurgery.plan.k for auxiliary k)
VIT_KEY = "mmsurgery.vit"  # the built-in ViT's config (models.vit.METADATA_KEY)
VIT_INFERRED = "inferred"  # in the mmsurgery.vit JSON: fields guessed, not learned (["num_heads"]); optional
INIT_SCALE_KEY = "mmsurgery.init_scale"
SCALE_MODE_KEY = "mmsurgery.scale_mode"  # written only when it is not per-linear
SCALES_KEY = "mmsurgery.scales"  # folded files: λ per layer (JSON)
SOURCE_KEY = "mmsurgery.source_sha256"  # folded files: sha256 of the paired input
TARGET_SHA256_KEY = "mmsurgery.target_sha256"  # paired (and folded) files: sha256 of the target pair read
AUX_SHA256_KEY = "mmsurgery.aux_sha256"  # ... and of auxiliary 0 (mmsurgery.aux_sha256.k for auxiliary k)
DIGEST_CHARS = 64  # a provenance value: 64 lowercase hex digits, written as PENDING_DIGEST first
PENDING_DIGEST = "-" * DIGEST_CHARS  # the fixed-width stand-in a writer patches by key; never a digest
PAIRED_FORMAT = "paired/1"  # one auxiliary, λ one value per linear: M2PT's own layout
PAIRED_FORMAT_2 = "paired/2"  # several auxiliaries, or λ per qkv chunk / per channel
FOLDED_FORMAT = "folded/1"
PAIRED_KIND, FOLDED_KIND = "paired", "folded"
READS = {PAIRED_KIND: 2, FOLDED_KIND: 1}  # the newest version of each kind this mmsurgery understands
MAX_VERSION_DIGITS = 9
_FORMAT = re.compile(rf"([a-z][a-z0-9_.-]{{0,31}})/([1-9][0-9]{{0,{MAX_VERSION_DIGITS - 1}}})", re.ASCII)


def plan_key(k: int = 0) -> str:
    return PLAN_KEY if k == 0 else f"{PLAN_KEY}.{k}"


def aux_sha256_key(k: int = 0) -> str:
    return AUX_SHA256_KEY if k == 0 else f"{AUX_SHA256_KEY}.{k}"


def provenance_keys(num_aux: int) -> list[str]:
    """The metadata keys that record the inputs' sha256: the target's, then each auxiliary's."""
    return [TARGET_SHA256_KEY, *(aux_sha256_key(k) for k in range(num_aux))]


def paired_metadata(
    target_metadata: Mapping[str, str],
    *,
    plans: Sequence[str],
    scale_mode: str,
    init_scale: float,
    vit: str | None,
    version: str,
    digests: bool,
) -> dict[str, str]:
    """The metadata of a paired file, in writing order: the target's own keys (not `mmsurgery.*`), `format: pt`,
    `mmsurgery.format` and `.version`, one plan per auxiliary (`plans`, their JSON), `init_scale`, `scale_mode`
    (when not per-linear), `vit` (when the target is a ViT) and, with `digests`, one `PENDING_DIGEST` per input
    under `provenance_keys`, which the writer patches by key once the hashes are done (`PENDING_DIGEST` is never
    published)."""
    metadata = {k: v for k, v in target_metadata.items() if not k.startswith("mmsurgery.")}
    metadata["format"] = "pt"  # torch tensors, as transformers writes it; readers that check it expect "pt"
    metadata |= {FORMAT_KEY: paired_format_value(len(plans), scale_mode), VERSION_KEY: version}
    metadata |= {plan_key(k): plan for k, plan in enumerate(plans)}
    metadata[INIT_SCALE_KEY] = repr(float(init_scale))
    if scale_mode != "per-linear":
        metadata[SCALE_MODE_KEY] = scale_mode
    if vit is not None:
        metadata[VIT_KEY] = vit
    if digests:
        metadata |= dict.fromkeys(provenance_keys(len(plans)), PENDING_DIGEST)
    return metadata


def _carried(key: str) -> bool:
    """What a folded file keeps of its paired input's `mmsurgery.*` metadata: plans, the ViT config, provenance."""
    return (
        key in (PLAN_KEY, VIT_KEY, TARGET_SHA256_KEY, AUX_SHA256_KEY)
        or key.startswith((f"{PLAN_KEY}.", f"{AUX_SHA256_KEY}."))
        or not key.startswith("mmsurgery.")
    )


def folded_metadata(paired: Mapping[str, str], *, scales: str, version: str, source_digest: bool) -> dict[str, str]:
    """The metadata of a folded file: what docs/formats.md documents for it and nothing else. From the paired
    input: its non-`mmsurgery` keys, plans, `mmsurgery.vit` and input digests; new: `format: pt`,
    `mmsurgery.format: folded/1`, `.version`, `.scales` (λ per layer, JSON) and, with `source_digest`, a
    `PENDING_DIGEST` under `SOURCE_KEY` for the writer to patch with the paired input's sha256. A digest the
    input carried under `SOURCE_KEY` is never carried over (it is not of this input)."""
    metadata = {k: v for k, v in paired.items() if _carried(k)}
    metadata |= {
        "format": "pt",
        FORMAT_KEY: FOLDED_FORMAT,
        VERSION_KEY: version,
        SCALES_KEY: scales,
    }
    if source_digest:
        metadata[SOURCE_KEY] = PENDING_DIGEST
    return metadata


def paired_format_value(num_aux: int, scale_mode: str) -> str:
    """`paired/1` for what M2PT itself could load (one auxiliary, one λ per linear), else `paired/2`."""
    return PAIRED_FORMAT if num_aux == 1 and scale_mode == "per-linear" else PAIRED_FORMAT_2


def check_format(metadata: Mapping[str, str], where: object) -> str | None:
    """The reader's rule for versions, the one place `mmsurgery.format` is parsed; returns the file's kind
    (`PAIRED_KIND`, `FOLDED_KIND`, or a kind this mmsurgery does not know), or None without the key.

    The value is `KIND/N`: a lowercase ASCII kind, a slash and a version of 1 to `MAX_VERSION_DIGITS` ASCII digits
    without a leading zero. Anything else (`paired/-1`, `paired/０１`, `paired/01`, a 5,000-digit version, no
    slash, an empty value) is a damaged file, refused in one line. A known kind (`paired`, `folded`) with a newer
    version than this mmsurgery reads is refused with one line saying to upgrade, rather than half-understood; an
    older version, an unknown kind or no `mmsurgery.format` at all (M2PT's own files, a plain model) is read by
    its tensor names."""
    value = metadata.get(FORMAT_KEY)
    if value is None:
        return None
    m = _FORMAT.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:50] + f"...' ({len(value):,} characters)"
        raise BadInputError(
            f"{where}: {FORMAT_KEY} is {shown}, not KIND/N such as 'paired/1' (N: 1 to {MAX_VERSION_DIGITS} ASCII "
            "digits); the metadata is damaged: write the file again with mmsurgery, or drop that key"
        )
    kind, version = m[1], int(m[2])
    newest = READS.get(kind)
    if newest is not None and version > newest:
        written_by = metadata.get(VERSION_KEY, "?")
        written_by = written_by if len(written_by) <= 40 else written_by[:40] + "..."
        raise BadInputError(
            f"{where}: {FORMAT_KEY} is {value!r}, written by a newer mmsurgery ({written_by}); "
            f"this one reads {kind}/1..{newest}: upgrade mmsurgery"
        )
    return kind


MAX_METADATA_JSON = 1_000_000  # characters of one JSON metadata value; mmsurgery's own are a few KB
MAX_JSON_INT_DIGITS = 20  # 2**64 - 1 has 20 digits: no count or size in a config is longer


def metadata_json(metadata: Mapping[str, str], key: str, where: object = None) -> object:
    """The JSON value of metadata entry `key` (`mmsurgery.vit`, ...), or None without one: the one parser of every
    JSON value mmsurgery reads from metadata, bounded so that a damaged or hostile value costs nothing and fails in
    one line (`BadInputError`) rather than deep in a stage. Refused: more than `MAX_METADATA_JSON` characters,
    nesting past Python's recursion limit, an integer of more than `MAX_JSON_INT_DIGITS` digits (Python's own limit
    of 4,300 digits would raise `ValueError` much later), `NaN`/`Infinity`, and anything that is not JSON."""
    value = metadata.get(key)
    if value is None:
        return None
    what = f"{where}: metadata {key!r}" if where is not None else f"metadata {key!r}"
    if not isinstance(value, str):
        raise BadInputError(f"{what} is {type(value).__name__}, not a JSON string")
    if len(value) > MAX_METADATA_JSON:
        raise BadInputError(
            f"{what} is {len(value):,} characters, more than the {MAX_METADATA_JSON:,} mmsurgery reads; "
            "the metadata is damaged"
        )
    try:
        return json.loads(value, parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:
        raise BadInputError(f"{what} is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and the refusals of the two hooks
        why = " ".join(str(e).split())[:120]
        raise BadInputError(f"{what} is not valid JSON ({why})") from None


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {digits:,} digits")
    return int(text)


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


# ---- the shape of λ -----------------------------------------------------------------------------------------
SCALE_MODES = ("per-linear", "per-qkv", "per-channel")
ONE_VALUE_SHAPES = ((1,), ())  # M2PT's `torch.zeros(1)`, or a 0-d tensor


def scale_shape(mode: str, weight_shape: Sequence[int], *, fused_qkv: bool, conv1d: bool) -> tuple[int, ...]:
    """λ's shape for a linear under `--scale mode`: per-linear one value (`[1]`, the paper's code); per-qkv three
    values along the output dimension of a fused qkv (one per q/k/v chunk: what split q/k/v targets get anyway;
    one value on other linears); per-channel one value per output channel. The output dimension is 0 for
    `nn.Linear` (`[out, in]`) and 1 for GPT-2's `Conv1D` (`[in, out]`)."""
    if mode not in SCALE_MODES:
        raise BadInputError(f"--scale {mode!r}: choose one of {', '.join(SCALE_MODES)}")
    if mode == "per-linear" or (mode == "per-qkv" and not fused_qkv) or len(weight_shape) != 2:
        return (1,)
    out_dim = 1 if conv1d else 0
    shape = [1, 1]
    shape[out_dim] = 3 if mode == "per-qkv" else int(weight_shape[out_dim])
    return tuple(shape)


def scale_problem(shape: Sequence[int], weight_shape: Sequence[int]) -> str | None:
    """Why λ of `shape` cannot scale a weight of `weight_shape`, or None. λ holds one value (`[1]` or `[]`), or has
    the weight's rank and, in each dimension, 1 or a divisor of the weight's size: each λ element then scales one
    contiguous block (`[3, 1]` on a fused qkv `[3d, d]`: one value per chunk; `[out, 1]`: one per row)."""
    shape, weight_shape = tuple(shape), tuple(weight_shape)
    if shape in ONE_VALUE_SHAPES:
        return None
    if len(shape) != len(weight_shape):
        if math.prod(shape) == 1:
            return f"has shape {list(shape)}; λ of one value must have shape [1] or [] (reshape it)"
        return (
            f"has shape {list(shape)}; λ holds one value ([1] or []), or one per block of W with W's rank "
            f"({list(weight_shape)})"
        )
    bad = [d for d, (s, w) in enumerate(zip(shape, weight_shape, strict=True)) if s < 1 or w % s]
    if bad:
        return f"has shape {list(shape)}; each size must divide the weight's {list(weight_shape)}"
    return None


def block_view(weight_shape: Sequence[int], shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Views under which λ broadcasts onto W elementwise: a dimension where λ has size s (1 < s < w) is split
    into (s, w/s) for W and (s, 1) for λ. `λ.view(b) * W.view(a)` is then one rounding per element, the same
    bits as multiplying by the expanded λ (this is how the training forward and the fold both compute it)."""
    w_view: list[int] = []
    s_view: list[int] = []
    for s, w in zip(shape, weight_shape, strict=True):
        if s in (1, w):
            w_view.append(w)
            s_view.append(s)
        else:
            w_view += [s, w // s]
            s_view += [s, 1]
    return tuple(w_view), tuple(s_view)


# ---- finding and reading the pathways -----------------------------------------------------------------------
ScaleValue = float | list[float]  # one λ: a float, or its values (finer λ) in row-major order
LayerScales = float | list[ScaleValue]  # a layer: a float (one auxiliary, one λ) or one entry per auxiliary


@dataclass(frozen=True)
class PathwaySpec:
    module: str
    scale_shapes: tuple[tuple[int, ...], ...]  # λ's shape per auxiliary

    @property
    def num_aux(self) -> int:
        return len(self.scale_shapes)

    def tensor_keys(self) -> list[str]:
        """Every pathway tensor of this linear: aux then λ, per auxiliary."""
        return [
            key
            for k in range(self.num_aux)
            for key in (aux_weight_key(self.module, k), cross_modal_scale_key(self.module, k))
        ]


def find_pathways(shapes: Mapping[str, Sequence[int]], where: object = "checkpoint") -> dict[str, PathwaySpec]:
    """The pathways among a checkpoint's names → shapes, in name order. Raises `FoldError` listing what is
    inconsistent: an aux_weight without its λ or the reverse, a gap in the auxiliary numbers, a missing or
    differently shaped `P.weight`, a λ shape that cannot scale W (`scale_problem`)."""
    problems: list[str] = []
    specs: dict[str, PathwaySpec] = {}
    for module, per_aux in group_pathway_keys(shapes).items():
        label = module or "(top level)"
        weight = shapes.get(weight_key(module))
        indices = sorted(per_aux)
        if (why := numbering_problem(indices)) is not None:
            problems.append(f"{label}: {why}")
            continue
        scale_shapes = []
        for k in indices:
            kinds = per_aux[k]
            if (why := missing_key(k, kinds)) is not None:
                problems.append(f"{label}: {why}")
            elif weight is None:
                problems.append(f"{label}: no weight")
            elif tuple(shapes[kinds["aux"]]) != tuple(weight):
                problems.append(f"{label}: {aux_suffix(k)} {list(shapes[kinds['aux']])} != weight {list(weight)}")
            elif (why := scale_problem(shapes[kinds["scale"]], weight)) is not None:
                problems.append(f"{label}: {scale_suffix(k)} {why}")
            else:
                scale_shapes.append(tuple(shapes[kinds["scale"]]))
        if len(scale_shapes) == len(indices):
            specs[module] = PathwaySpec(module, tuple(scale_shapes))
    if problems:
        raise FoldError(f"{where}: not a consistent paired checkpoint: {'; '.join(problems[:4])}")
    return specs


def _checkpoint_pathways(ck: Checkpoint) -> dict[str, PathwaySpec]:
    """`find_pathways` of an open checkpoint, after `check_format` (λ not read: `paired_view` gives both)."""
    check_format(ck.metadata, ck.path)
    return find_pathways({k: i.shape for k, i in ck.infos.items()}, ck.path)


def scale_entry(values: Sequence[Sequence[float]]) -> LayerScales:
    """A layer's λ for reports and JSON, from each auxiliary's values: a float in the classic case (one auxiliary,
    one value: what every one-auxiliary file gives, as before), else a list with one entry per auxiliary, each a
    float (one value) or the list of its values."""
    entries: list[ScaleValue] = [float(v[0]) if len(v) == 1 else [float(x) for x in v] for v in values]
    return entries[0] if len(entries) == 1 and isinstance(entries[0], float) else entries


def scale_means(entry: LayerScales) -> list[float]:
    """One number per auxiliary for a chart or a summary: λ itself, or the mean of a finer λ."""
    items = [entry] if isinstance(entry, (int, float)) else entry
    return [float(v) if isinstance(v, (int, float)) else sum(v) / len(v) for v in items]


def scale_values(entry: LayerScales) -> list[float]:
    """Every λ value of a layer, flat (for finiteness checks)."""
    items = [entry] if isinstance(entry, (int, float)) else entry
    return [x for v in items for x in ([v] if isinstance(v, (int, float)) else v)]


def read_scales(ck: Checkpoint, pathways: Mapping[str, PathwaySpec]) -> dict[str, LayerScales]:
    """λ of each pathway (`find_pathways`), read without torch from a safetensors file, as `scale_entry` gives it."""
    return {
        p: scale_entry([ck.read_floats(cross_modal_scale_key(p, k)) for k in range(spec.num_aux)])
        for p, spec in pathways.items()
    }


# ---- one opener ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedCheckpoint:
    """A checkpoint opened as a paired checkpoint: its format version checked (`check_format`), its pathways found
    and validated (`find_pathways`) and its λ read (`read_scales`), once, before any caller looks at it. A file
    without pathway tensors is a valid, plain one (`is_plain`). Tensors stay in `ck`, read lazily; closing this
    (`close()`, or leaving `with open_paired(path) as paired:`) closes `ck`. Build it with `open_paired` or
    `paired_view`."""

    ck: Checkpoint
    pathways: dict[str, PathwaySpec]  # module path (the names in the file) -> its pathway, in name order
    scales: dict[str, LayerScales]  # module path -> λ as `scale_entry` gives it; {} for a plain file
    format: str | None  # the file's `mmsurgery.format`, or None (M2PT's own files, a plain model)

    @property
    def path(self) -> Path:
        return self.ck.path

    @property
    def metadata(self) -> dict[str, str]:
        return self.ck.metadata

    @property
    def is_plain(self) -> bool:
        """No pathway tensors: folding it is a no-op, attaching from it finds nothing."""
        return not self.pathways

    @property
    def num_aux(self) -> int:
        """The most auxiliaries any pathway has (0 for a plain file; `attach` requires all layers to agree)."""
        return max((spec.num_aux for spec in self.pathways.values()), default=0)

    @property
    def pathway_keys(self) -> list[str]:
        """Every pathway tensor's name (`aux_weight*`, `cross_modal_scale*`), in file order."""
        return [name for name in self.ck.infos if is_pathway_key(name)]

    @property
    def plain_keys(self) -> list[str]:
        """Every other tensor's name (the target's: what the plain model has), in file order."""
        return [name for name in self.ck.infos if not is_pathway_key(name)]

    @property
    def nonfinite_layers(self) -> list[str]:
        """The pathways whose λ holds a NaN or an infinity, in name order."""
        return [p for p, v in self.scales.items() if not all(math.isfinite(x) for x in scale_values(v))]

    def plan_json(self, k: int = 0) -> str | None:
        """The pairing plan of auxiliary `k` as `pair` recorded it (`mmsurgery.plan[.k]`), or None."""
        return self.ck.metadata.get(plan_key(k))

    def close(self) -> None:
        self.ck.close()

    def __enter__(self) -> PairedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def paired_view(ck: Checkpoint) -> PairedCheckpoint:
    """`ck` as a paired checkpoint (see `PairedCheckpoint`); `ck` stays the caller's to close. Raises
    `BadInputError` for a newer format version and `FoldError` for inconsistent pathways, each in one line. λ is
    read without torch from a safetensors file."""
    pathways = _checkpoint_pathways(ck)
    scales = read_scales(ck, pathways) if pathways else {}
    return PairedCheckpoint(ck=ck, pathways=pathways, scales=scales, format=ck.metadata.get(FORMAT_KEY))


def open_paired(path: str | os.PathLike[str], key: str | None = None) -> PairedCheckpoint:
    """Open `path` (anything `open_checkpoint` reads; `key` picks a pickle's or DCP folder's wrapper entry) as a
    paired checkpoint: `with open_paired(path) as paired: ...`. The checkpoint is closed again if it is refused
    (`paired_view`'s errors)."""
    ck = open_checkpoint(path, key=key)
    try:
        return paired_view(ck)
    except BaseException:
        ck.close()
        raise
