"""Alignment: which auxiliary linear (and transform) feeds each target block linear, decided from headers only."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.dtypes import FLOATING
from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.checkpoint.pins import check_regular
from mmsurgery.errors import BadInputError, PairingError
from mmsurgery.layout.detect import Block, Linear, Stack, choose_stack, detect
from mmsurgery.paired_format import DEFAULT_ROLES, PAIRABLE_ROLES, SCALE_MODES, module_of, scale_shape, weight_key
from mmsurgery.pairing.plan import Pair, Plan, Skip, Source
from mmsurgery.pairing.transforms import Transform

__all__ = ["DEFAULT_ROLES", "DEPTH_POLICIES", "align", "depth_map"]

DEPTH_POLICIES = ("stretch", "first", "last", "index")
_QKV_PART = {"q": 0, "k": 1, "v": 2}


def depth_map(target_depth: int, aux_depth: int, policy: str) -> list[int | None]:
    """Target block i <- aux block depth_map[i]; None leaves the target block without a pathway.

    stretch: ⌊(i + ½)·L_aux / L_target⌋ — relative depth kept, the identity when depths match.
    first: i (M2PT's `zip`); last: i - L_target + L_aux (output ends aligned); index: i, equal depths only.
    """
    lt, la = target_depth, aux_depth
    if policy == "stretch":
        return [min(la - 1, (2 * i + 1) * la // (2 * lt)) for i in range(lt)]
    if policy == "first":
        return [i if i < la else None for i in range(lt)]
    if policy == "last":
        return [i - lt + la if 0 <= i - lt + la < la else None for i in range(lt)]
    if policy == "index":
        if lt != la:
            raise PairingError(f"--depth index needs equal depths, got target {lt} and aux {la}; try --depth stretch")
        return list(range(lt))
    raise PairingError(f"unknown depth policy {policy!r}; choose one of {', '.join(DEPTH_POLICIES)}")


def _source(ck: Checkpoint, stack: Stack, digest: str | None) -> Source:
    return Source(
        path=str(ck.path),
        sha256=digest,
        format=ck.format,
        stack=stack.prefix,
        family=stack.family,
        depth=stack.depth,
        width=stack.width,
    )


def _expand_roles(roles: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(roles) if roles else DEFAULT_ROLES
    bad = [r for r in chosen if r not in PAIRABLE_ROLES]
    if bad:
        raise PairingError(f"unknown layer role(s) {bad}; choose from {', '.join(PAIRABLE_ROLES)}")
    return chosen


def _wanted(role: str, roles: tuple[str, ...]) -> bool:
    return role in roles or (role in _QKV_PART and "qkv" in roles)


def _propose(lin: Linear, aux: Block, aux_conv1d: bool, target_conv1d: bool) -> tuple[tuple[str, ...], Transform] | str:
    """The aux key(s) and transform for one target linear, or the reason there is none."""
    conv = {"aux_conv1d": aux_conv1d, "target_conv1d": target_conv1d}
    same = aux.get(lin.role)
    if same is not None:
        return (same.key,), Transform("copy", **conv)
    if lin.role == "qkv":
        parts = [aux.get(r) for r in ("q", "k", "v")]
        if all(parts):
            return tuple(p.key for p in parts), Transform("cat_qkv", **conv)  # type: ignore[union-attr]
    if lin.role in _QKV_PART and (fused := aux.get("qkv")) is not None:
        return (fused.key,), Transform("chunk_qkv", _QKV_PART[lin.role], **conv)
    if lin.role.startswith("mlp") and aux.get("mlp_gated") is not None:
        return "aux block has a gated MLP (not pairable with a plain MLP)"
    return f"aux block has no {lin.role} linear"


def _transform_for_keys(
    lin: Linear, keys: Sequence[str], aux_linears: Mapping[str, Linear], aux_conv1d: bool, target_conv1d: bool
) -> Transform | str:
    """An explicit `--map` entry: infer the transform from the target role and the aux shapes."""
    shapes = [aux_linears[k].out_features for k in keys]
    conv = {"aux_conv1d": aux_conv1d, "target_conv1d": target_conv1d}
    if len(keys) == 3:
        return Transform("cat_qkv", **conv)
    if len(keys) == 1 and shapes[0] == 3 * lin.out_features and lin.role in _QKV_PART:
        return Transform("chunk_qkv", _QKV_PART[lin.role], **conv)
    if len(keys) == 1:
        return Transform("copy", **conv)
    return f"a map entry needs 1 aux key, or 3 (q, k, v) for a fused target; got {len(keys)}"


def _load_map(map_file: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if map_file is None:
        return {}
    if isinstance(map_file, Mapping):
        data: Any = dict(map_file)
    else:
        try:
            check_regular(Path(map_file))  # a FIFO would block the read
            data = json.loads(Path(map_file).read_text(encoding="utf-8"))
        except BadInputError as e:
            raise BadInputError(f"--map {e}") from None
        except RecursionError:
            raise BadInputError(f"--map {map_file}: not a readable JSON file (nested too deeply)") from None
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError, a number past Python's digit limit
            raise BadInputError(
                f"--map {map_file}: not a readable JSON file ({' '.join(str(e).split())[:200]})"
            ) from None
    if not isinstance(data, dict) or not set(data) <= {"blocks", "linears"}:
        raise BadInputError('--map: expected a JSON object with "blocks" and/or "linears"')
    return data


def align(
    target: Checkpoint,
    aux: Checkpoint,
    *,
    roles: Sequence[str] | None = None,
    depth: str = "stretch",
    map_file: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    target_stack: str | None = None,
    aux_stack: str | None = None,
    strict: bool = False,
    digests: tuple[str, str] | None = None,
    hash_inputs: bool = True,
    aux_index: int = 0,
    scale: str = "per-linear",
) -> Plan:
    """Pair each target block linear of the chosen roles with its auxiliary counterpart.

    Width mismatches are skipped and reported; `strict` turns any skip into a `PairingError`; nothing paired at
    all is always a `PairingError`. `digests` are the inputs' sha256 when the caller has them; otherwise both
    files are hashed here, in parallel, unless `hash_inputs=False` leaves the plan's digests out (`pair` hashes
    while it writes and records them under their own metadata keys: `paired_format.provenance_keys`). `map_file` ({"blocks": {"i": j|null}, "linears": {target_key: aux_key |
    [q, k, v] | null}}) overrides the depth policy and individual pairings. `aux_index` numbers this auxiliary
    among several paired into one file (its keys: `paired_format.aux_weight_key`); `scale` is λ's granularity
    (`paired_format.scale_shape`: per-linear, per-qkv, per-channel).
    """
    if scale not in SCALE_MODES:
        raise BadInputError(f"--scale {scale!r}: choose one of {', '.join(SCALE_MODES)}")
    known: tuple[str | None, str | None] = (None, None) if digests is None else digests
    if digests is None and hash_inputs:
        jobs = HashJob(target.files, target.open_pinned), HashJob(aux.files, aux.open_pinned)
        known = jobs[0].result(), jobs[1].result()
    wanted = _expand_roles(roles)
    t_stack = choose_stack(detect(target.infos), target_stack, what=f"target {target.path}")
    a_stack = choose_stack(detect(aux.infos), aux_stack, what=f"aux {aux.path}")
    overrides = _load_map(map_file)
    dmap: list[int | None] = depth_map(t_stack.depth, a_stack.depth, depth)
    for i, j in (overrides.get("blocks") or {}).items():
        if not (str(i).isdigit() and int(i) < t_stack.depth) or not (
            j is None or (isinstance(j, int) and 0 <= j < a_stack.depth)
        ):
            raise BadInputError(f"--map: block entry {i!r}: {j!r} is out of range ({t_stack.depth} <- {a_stack.depth})")
        dmap[int(i)] = j
    aux_blocks = {b.index: b for b in a_stack.blocks}
    aux_linears = {lin.key: lin for b in a_stack.blocks for lin in b.linears}
    linear_map: dict[str, Any] = overrides.get("linears") or {}
    target_linears = {lin.key for b in t_stack.blocks for lin in b.linears}
    unknown = [k for k in linear_map if k not in target_linears]
    unknown_aux = [
        a for v in linear_map.values() for a in ([v] if isinstance(v, str) else v or []) if a not in aux_linears
    ]
    if unknown or unknown_aux:
        raise BadInputError(f"--map: unknown target linear(s) {unknown[:3]} / aux linear(s) {unknown_aux[:3]}")
    t_conv, a_conv = t_stack.orientation == "conv1d", a_stack.orientation == "conv1d"

    pairs: list[Pair] = []
    skips: list[Skip] = []
    for pos, block in enumerate(t_stack.blocks):
        j = dmap[pos]
        for lin in block.linears:
            explicit = lin.key in linear_map
            if not explicit and not _wanted(lin.role, wanted):
                continue
            aux_block = aux_blocks.get(j) if j is not None else None

            def skip(reason: str, keys: tuple[str, ...] = (), shape: tuple[int, ...] | None = None) -> None:
                skips.append(
                    Skip(
                        target_key=lin.key,  # noqa: B023
                        target_shape=lin.shape,  # noqa: B023
                        target_block=block.index,  # noqa: B023
                        role=lin.role,  # noqa: B023
                        aux_keys=keys,
                        aux_shape=shape,
                        reason=reason,
                    )
                )

            if weight_key(module_of(lin.key)) != lin.key:
                skip("not a module's .weight (e.g. nn.MultiheadAttention in_proj_weight): the pathway cannot attach")
                continue
            if explicit:
                entry = linear_map[lin.key]
                if entry is None:
                    skip("skipped by --map")
                    continue
                keys = (entry,) if isinstance(entry, str) else tuple(entry)
                proposal: Any = _transform_for_keys(lin, keys, aux_linears, a_conv, t_conv)
                proposal = (keys, proposal) if isinstance(proposal, Transform) else proposal
                aux_block_index = next(
                    (b.index for b in a_stack.blocks if any(x.key == keys[0] for x in b.linears)), None
                )
            elif aux_block is None:
                skip(f"no aux block for target block {block.index} (--depth {depth})")
                continue
            else:
                proposal = _propose(lin, aux_block, a_conv, t_conv)
                aux_block_index = aux_block.index
            if isinstance(proposal, str):
                skip(proposal)
                continue
            keys, transform = proposal
            got = transform.out_shape([aux_linears[k].shape for k in keys])
            if got != lin.shape:
                skip(_mismatch(lin, got, t_conv), keys, got)
                continue
            integral = _not_floating(target, (lin.key,)) or _not_floating(aux, keys)
            if integral:  # fold would refuse W + λ·W_aux here (a quantized or index tensor, not a linear's weight)
                skip(f"{integral}: not floating point; a pathway W + λ·W_aux needs floating W and W_aux", keys, got)
                continue
            lam = scale_shape(scale, lin.shape, fused_qkv=lin.role == "qkv", conv1d=t_conv)
            pairs.append(
                Pair(
                    target_key=lin.key,
                    target_shape=lin.shape,
                    target_block=block.index,
                    role=lin.role,
                    aux_keys=keys,
                    aux_block=aux_block_index,
                    transform=transform,
                    aux_index=aux_index,
                    scale_shape=lam,
                )
            )

    plan = Plan(
        target=_source(target, t_stack, known[0]),
        aux=_source(aux, a_stack, known[1]),
        depth_policy="map" if overrides.get("blocks") else depth,
        depth_map=tuple(dmap),
        roles=wanted,
        pairs=tuple(pairs),
        skips=tuple(skips),
        warnings=tuple(_warnings(t_stack, a_stack, pairs)),
        map_file=None if map_file is None or isinstance(map_file, Mapping) else str(map_file),
        aux_index=aux_index,
        scale_mode=scale,
    )
    if not pairs:
        first = skips[0].reason if skips else "no linears of the chosen roles"
        raise PairingError(f"nothing paired: {len(skips)} linears skipped (first: {first}); {plan.summary}")
    if strict and skips:
        s = skips[0]
        raise PairingError(f"--strict: {len(skips)} linear(s) skipped, first {s.target_key}: {s.reason}")
    return plan


def _not_floating(ck: Checkpoint, keys: Sequence[str]) -> str | None:
    """`key dtype` of the first of `keys` whose tensor is not floating point, else None (headers only)."""
    for key in keys:
        info = ck.infos.get(key)
        if info is not None and info.dtype not in FLOATING:
            return f"{key} {info.dtype}"
    return None


def _mismatch(lin: Linear, got: tuple[int, ...], conv1d: bool) -> str:
    g_out, g_in = (got[1], got[0]) if conv1d else got
    parts = []
    if g_in != lin.in_features:
        parts.append(f"in {lin.in_features}≠{g_in}")
    if g_out != lin.out_features:
        parts.append(f"out {lin.out_features}≠{g_out}")
    return f"shape mismatch {list(lin.shape)} vs aux {list(got)} ({', '.join(parts)})"


def _warnings(t: Stack, a: Stack, pairs: Sequence[Pair]) -> list[str]:
    out = []
    if t.norm != a.norm and "unknown" not in (t.norm, a.norm):
        out.append(f"norm placement differs: target {t.norm}-norm, aux {a.norm}-norm (shapes match; semantics differ)")
    reused = Counter(aux for aux, _ in {(p.aux_block, p.target_block) for p in pairs})
    if any(n > 1 for n in reused.values()):
        out.append("some aux blocks feed several target blocks; each target linear gets its own copy of W_aux")
    if a.ema or a.decoder:
        out.append(f"aux stack {a.prefix} is a {'decoder' if a.decoder else 'EMA copy'}")
    return out
