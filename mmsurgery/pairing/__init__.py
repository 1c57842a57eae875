"""Pairing: align a target's block linears with an auxiliary model's, and write the paired checkpoint."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.errors import BadInputError
from mmsurgery.hf import output_for
from mmsurgery.pairing.align import DEFAULT_ROLES, DEPTH_POLICIES, align, depth_map
from mmsurgery.pairing.paired import PairedWrite, default_output, write_paired
from mmsurgery.pairing.plan import Pair, Plan, Skip, Source
from mmsurgery.pairing.transforms import Transform

__all__ = [
    "DEFAULT_ROLES",
    "DEPTH_POLICIES",
    "Pair",
    "PairResult",
    "Plan",
    "Skip",
    "Source",
    "Transform",
    "align",
    "depth_map",
    "pair",
]


@dataclass(frozen=True)
class PairResult:
    plan: Plan
    output: Path | None  # what to open or `from_pretrained`: a model folder, an index, or the file; None: dry run
    written: PairedWrite | None


def pair(
    target: str | os.PathLike[str],
    aux: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    roles: Sequence[str] | None = None,
    depth: str = "stretch",
    map_file: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    target_stack: str | None = None,
    aux_stack: str | None = None,
    target_key: str | None = None,
    aux_key: str | None = None,
    strict: bool = False,
    init_scale: float = 0.0,
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

    A `target` that is a Hugging Face model folder (a folder with `config.json`) gives a model folder:
    `<target>.paired/` beside it by default, or the folder `out` names, holding `model.safetensors` (or shards and
    their index) and the target's `config.json`, processor and tokenizer files (`hf.model_folder`), so
    `from_pretrained` loads it as is; `out` naming a `.safetensors` file still writes that one file."""
    if not math.isfinite(init_scale):
        raise BadInputError(f"--init-scale {init_scale}: λ must start at a finite number (the paper's is 0)")
    with open_checkpoint(target, key=target_key) as t, open_checkpoint(aux, key=aux_key) as a:
        options: dict[str, Any] = dict(
            roles=roles, depth=depth, map_file=map_file, target_stack=target_stack, aux_stack=aux_stack, strict=strict
        )
        if dry_run:
            return PairResult(align(t, a, **options), None, None)
        jobs = (
            HashJob(t.files, 0, t.open_pinned),
            HashJob(a.files, 1, a.open_pinned),
        )  # hashed on the other core while tensors stream
        plan = align(t, a, digests=(jobs[0].placeholder, jobs[1].placeholder), **options)
        dest, extra_files = output_for(out, target, default_output(t.path), ".paired")
        digests = {job.placeholder: job for job in jobs}
        written = write_paired(
            plan,
            t,
            a,
            dest,
            init_scale=init_scale,
            heads=heads,
            force=force,
            shard_size=shard_size,
            digests=digests,
            extra_files=extra_files,
            on_progress=on_progress,
        )
        final = replace(
            plan,
            target=replace(plan.target, sha256=jobs[0].result()),
            aux=replace(plan.aux, sha256=jobs[1].result()),
        )
        output = written.result.path.parent if extra_files is not None else written.result.path
        return PairResult(final, output, written)
