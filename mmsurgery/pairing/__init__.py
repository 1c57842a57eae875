"""Pairing: align a target's block linears with an auxiliary model's, and write the paired checkpoint."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.errors import BadInputError, PairingError
from mmsurgery.hf import output_for
from mmsurgery.paired_format import FORMAT_KEY, PAIRED_KIND, check_format, is_pathway_key
from mmsurgery.pairing.align import DEFAULT_ROLES, DEPTH_POLICIES, align, depth_map
from mmsurgery.pairing.paired import PairedWrite, VitRecord, default_output, vit_metadata, write_paired
from mmsurgery.pairing.plan import Pair, Plan, Skip, Source
from mmsurgery.pairing.transforms import Transform
from mmsurgery.per_aux import per_aux

__all__ = [
    "DEFAULT_ROLES",
    "DEPTH_POLICIES",
    "Pair",
    "PairResult",
    "Plan",
    "Skip",
    "Source",
    "Transform",
    "VitRecord",
    "align",
    "depth_map",
    "pair",
]


@dataclass(frozen=True, kw_only=True)
class PairResult:
    plan: Plan  # the first auxiliary's plan (the only one, with one auxiliary)
    output: Path | None  # what to open or `from_pretrained`: a model folder, an index, or the file; None: dry run
    written: PairedWrite | None
    plans: tuple[Plan, ...] = ()  # one per auxiliary, in order
    vit: VitRecord | None = None  # the built-in ViT config recorded as `mmsurgery.vit` (None: not a timm-named ViT)

    def to_json(self) -> dict[str, Any]:
        """One auxiliary: the plan's JSON (+ `output`, `vit`), as always; several: `{"plans": [...], "output",
        "vit"}`."""
        plans = self.plans or (self.plan,)
        data = plans[0].to_json() if len(plans) == 1 else {"plans": [p.to_json() for p in plans]}
        data["output"] = str(self.output) if self.output else None
        data["vit"] = self.vit.to_json() if self.vit is not None else None
        return data


def _common(plans: list[Plan], strict: bool = False) -> list[Plan]:
    """Several auxiliaries: keep the linears every one of them pairs (each pathway has one λ per auxiliary); a
    linear some pair and others skip becomes a skip in every plan, with the reason of the first that skipped it.
    `strict` makes such a skip a `PairingError`, as `align` does for its own."""
    if len(plans) == 1:
        return plans
    paired = [{p.target_key for p in pl.pairs} for pl in plans]
    everywhere = set.intersection(*paired)
    why: dict[str, str] = {}
    for k, pl in enumerate(plans):
        for s in pl.skips:
            why.setdefault(s.target_key, f"auxiliary {k + 1} skips it: {s.reason}")
    out = []
    for pl in plans:
        dropped = [p for p in pl.pairs if p.target_key not in everywhere]
        skips = [
            Skip(
                target_key=p.target_key,
                target_shape=p.target_shape,
                target_block=p.target_block,
                role=p.role,
                aux_keys=p.aux_keys,
                aux_shape=None,
                reason=why.get(p.target_key, "not paired by every auxiliary model"),
            )
            for p in dropped
        ]
        out.append(
            replace(pl, pairs=tuple(p for p in pl.pairs if p.target_key in everywhere), skips=pl.skips + tuple(skips))
        )
    if not everywhere:
        raise PairingError("nothing paired: no linear is paired by every auxiliary model")
    first = next((s for pl in out for s in pl.skips), None)  # under strict, align has refused its own skips already
    if strict and first is not None:
        raise PairingError(f"--strict: {first.target_key} is skipped: {first.reason}")
    return out


def _refuse_paired(ck: Checkpoint, role: str) -> None:
    """`pair` takes plain models: a paired input (pathway tensors, or `mmsurgery.format` `paired/N`) is refused,
    naming it. As an auxiliary its plain keys are its own target's weights, so the target would be paired with a
    model it may well be; as the target it would get pathways on top of pathways."""
    kind = check_format(ck.metadata, ck.path)
    found = next((name for name in ck.infos if is_pathway_key(name)), None)
    if found is None and kind != PAIRED_KIND:
        return
    value = ck.metadata.get(FORMAT_KEY)
    why = f"holds pathway tensors, e.g. {found!r}" if found is not None else f"{FORMAT_KEY} is {value!r}"
    if role == "TARGET":
        fix = "give the plain target (several auxiliaries pair in one run: pair TARGET AUX1 AUX2), or fold it first"
    else:
        fix = "its other tensors are its own target's weights: give the plain auxiliary model, or fold it first"
    raise PairingError(f"{ck.path}: {role} is already paired ({why}); {fix}")


def _refuse_itself(target: Checkpoint, aux: Checkpoint, role: str) -> None:
    """The target named again as an auxiliary (the same file, through any path or link): the pathway would add the
    target's own weights to themselves, which no auxiliary modality brings."""
    same = [f for f in aux.files if any(_same_file(f, g) for g in target.files)]
    if same:
        raise PairingError(
            f"{aux.path}: {role} is the target itself ({same[0]} is one of TARGET's files); give an auxiliary model "
            "of another modality"
        )


def _same_file(a: os.PathLike[str], b: os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def pair(
    target: str | os.PathLike[str],
    aux: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    roles: Sequence[str] | None = None,
    depth: str | Sequence[str] = "stretch",
    map_file: str | os.PathLike[str] | Mapping[str, Any] | Sequence[Any] | None = None,
    target_stack: str | None = None,
    aux_stack: str | Sequence[str | None] | None = None,
    target_entry: str | None = None,
    aux_entry: str | Sequence[str | None] | None = None,
    strict: bool = False,
    init_scale: float = 0.0,
    scale: str = "per-linear",
    heads: int | None = None,
    force: bool = False,
    shard_size: int | str | None = None,
    dry_run: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> PairResult:
    """Align `target` with `aux` and (unless `dry_run`) write the paired checkpoint to `out`
    (default: `<target stem>.paired.safetensors` beside the target). `init_scale` must be finite: a paired file
    whose λ is NaN or infinite could never be folded. `on_progress(bytes_written, bytes_total)` is called after
    each tensor written.

    `aux` may be several auxiliary models: `W + Σₖ λₖ·W_auxₖ`, the k-th one's tensors named `P.aux_weight_k` and
    `P.cross_modal_scale_k` (k ≥ 1; the first keeps M2PT's names). `depth`, `map_file`, `aux_stack` and `aux_entry`
    take one value for all or one per auxiliary; only linears every auxiliary pairs get a pathway. `scale` is
    λ's granularity: `per-linear` (one value, the paper's code), `per-qkv` (one per q/k/v chunk of a fused qkv),
    `per-channel` (one per output channel).

    A `target` that is a Hugging Face model folder (a folder with `config.json`) gives a model folder:
    `<target>.paired/` beside it by default, or the folder `out` names, holding `model.safetensors` (or shards and
    their index) and the target's `config.json`, processor and tokenizer files (`hf.model_folder`), so
    `from_pretrained` loads it as is; `out` naming a `.safetensors` file still writes that one file."""
    if not math.isfinite(init_scale):
        raise BadInputError(f"--init-scale {init_scale}: λ must start at a finite number (the paper's is 0)")
    aux_paths = [aux] if isinstance(aux, (str, os.PathLike)) else list(aux)
    if not aux_paths:
        raise BadInputError("pair needs at least one auxiliary model")
    n = len(aux_paths)
    depths = per_aux(depth, n, "--depth", lone_list_for_all=True)
    maps = per_aux(map_file, n, "--map", lone_list_for_all=True)
    stacks = per_aux(aux_stack, n, "--aux-stack", lone_list_for_all=True)
    keys = per_aux(aux_entry, n, "--aux-key", lone_list_for_all=True)
    with contextlib.ExitStack() as stack:
        t = stack.enter_context(open_checkpoint(target, key=target_entry))
        auxes = [stack.enter_context(open_checkpoint(a, key=k)) for a, k in zip(aux_paths, keys, strict=True)]
        _refuse_paired(t, "TARGET")
        for k, a in enumerate(auxes):
            role = f"auxiliary model {k + 1}" if n > 1 else "AUX"
            _refuse_paired(a, role)
            _refuse_itself(t, a, role)
        common: dict[str, Any] = dict(roles=roles, target_stack=target_stack, strict=strict, scale=scale)

        def options(k: int) -> dict[str, Any]:
            return common | dict(depth=depths[k], map_file=maps[k], aux_stack=stacks[k], aux_index=k)

        if dry_run:
            plans = _common([align(t, a, **options(k)) for k, a in enumerate(auxes)], strict)
            return PairResult(plan=plans[0], output=None, written=None, plans=tuple(plans), vit=vit_metadata(t, heads))
        jobs = [HashJob(t.files, t.open_pinned)]  # hashed on the other core while tensors stream
        jobs += [HashJob(a.files, a.open_pinned) for a in auxes]
        plans = _common([align(t, a, hash_inputs=False, **options(k)) for k, a in enumerate(auxes)], strict)
        dest, extra_files = output_for(out, target, default_output(t.path), ".paired", occupied=t.folder)
        written = write_paired(
            plans,
            t,
            auxes,
            dest,
            init_scale=init_scale,
            heads=heads,
            force=force,
            shard_size=shard_size,
            digests=jobs,
            extra_files=extra_files,
            on_progress=on_progress,
        )
        final = tuple(
            replace(
                pl,
                target=replace(pl.target, sha256=jobs[0].result()),
                aux=replace(pl.aux, sha256=jobs[k + 1].result()),
            )
            for k, pl in enumerate(plans)
        )
        output = written.result.path.parent if extra_files is not None else written.result.path
        return PairResult(plan=final[0], output=output, written=written, plans=final, vit=written.vit)
