"""Writing the paired checkpoint: every target tensor unchanged, plus `<linear>.aux_weight` (already in the
target's layout and dtype) and `<linear>.cross_modal_scale` (λ) per paired linear, streamed one tensor at a time.

Those key names are what `model.state_dict()` shows with the pathway attached (mmsurgery.pathway), and the
names M2PT's own `CrossModalReparamLinear` saves, so the file loads with a strict `load_state_dict`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmsurgery import __version__
from mmsurgery.checkpoint.dtypes import ITEMSIZE
from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.reader import Checkpoint, TensorInfo
from mmsurgery.checkpoint.writer import SafetensorsWriter, WriteResult
from mmsurgery.errors import BadInputError
from mmsurgery.paired_format import (
    FORMAT_KEY,
    INIT_SCALE_KEY,
    SCALE_MODE_KEY,
    VERSION_KEY,
    VIT_KEY,
    paired_format,
    plan_key,
)
from mmsurgery.pairing.plan import Plan


@dataclass(frozen=True)
class PairedWrite:
    result: WriteResult
    metadata: dict[str, str]


def default_output(target: Path) -> Path:
    """`<target stem>.paired.safetensors` beside the target (`model.safetensors.index.json` -> `model.paired...`)."""
    name = target.name.removesuffix(".index.json")
    return target.with_name(Path(name).stem + ".paired.safetensors")


def vit_metadata(target: Checkpoint, heads: int | None) -> str | None:
    """The built-in ViT config of a timm-named ViT target (heads: `heads`, else the target's own metadata, else
    the head-dim-64 rule of `models.vit.config_from_state_dict`); None when the target is not such a ViT."""
    from mmsurgery.models.vit import config_from_state_dict

    shapes = {name: info.shape for name, info in target.infos.items()}
    try:
        return json.dumps(config_from_state_dict(shapes, num_heads=heads, metadata=target.metadata).to_dict())
    except BadInputError:
        if heads is not None:
            raise
        return None


def write_paired(
    plan: Plan | Sequence[Plan],
    target: Checkpoint,
    aux: Checkpoint | Sequence[Checkpoint],
    out: str | os.PathLike[str],
    *,
    init_scale: float = 0.0,
    heads: int | None = None,
    force: bool = False,
    shard_size: int | str | None = None,
    digests: Mapping[str, HashJob] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PairedWrite:
    """Stream the paired checkpoint to `out`: the target's tensors, then per auxiliary (one plan and one
    checkpoint each, in order) its `aux_weight` and `cross_modal_scale` per paired linear. `digests` maps
    placeholders in the plans to the hash jobs whose results replace them in the header at commit; `extra_files`
    (a folder output's other files, such as a model folder's `config.json`) are published with it."""
    import torch

    plans = [plan] if isinstance(plan, Plan) else list(plan)
    auxes = [aux] if isinstance(aux, Checkpoint) else list(aux)
    clash = [p.aux_weight_key for pl in plans for p in pl.pairs if p.aux_weight_key in target.infos]
    if clash:
        raise BadInputError(f"{target.path} already holds pathway tensors (e.g. {clash[0]}): it is already paired")
    specs = list(target.infos.values())
    for pl in plans:
        for p in pl.pairs:
            dtype = target.infos[p.target_key].dtype
            specs.append(TensorInfo(p.aux_weight_key, dtype, p.target_shape))
            specs.append(TensorInfo(p.scale_key, "float32", p.scale_shape))  # λ stays float32, as the pathway keeps it
    mode = plans[0].scale_mode
    metadata = {k: v for k, v in target.metadata.items() if not k.startswith("mmsurgery.")}
    metadata["format"] = "pt"  # torch tensors, as transformers writes it; readers that check it expect "pt"
    metadata |= {FORMAT_KEY: paired_format(len(plans), mode), VERSION_KEY: __version__}
    metadata |= {plan_key(k): pl.dumps() for k, pl in enumerate(plans)}
    metadata[INIT_SCALE_KEY] = repr(float(init_scale))
    if mode != "per-linear":
        metadata[SCALE_MODE_KEY] = mode
    vit = vit_metadata(target, heads)
    if vit is not None:
        metadata[VIT_KEY] = vit
    inputs = [target.path, *target.files, *(f for a in auxes for f in (a.path, *a.files))]  # an index is an input too
    with SafetensorsWriter(
        out,
        specs,
        metadata=metadata,
        shard_size=shard_size,
        force=force,
        inputs=inputs,
        extra_files=extra_files,
        on_progress=on_progress,
    ) as w:
        aux_bytes = (
            sum(a.infos[k].numel * ITEMSIZE[a.infos[k].dtype] for k in p.aux_keys)
            for pl, a in zip(plans, auxes, strict=True)
            for p in pl.pairs
        )
        largest = max((i.numel * ITEMSIZE[i.dtype] for i in target.infos.values()), default=0)
        buf = torch.empty(max(largest, *aux_bytes, 0), dtype=torch.uint8)  # reused: no fresh pages per tensor
        for name in target.infos:
            w.write(name, target.read_into(name, buf))
        for pl, a in zip(plans, auxes, strict=True):
            for p in pl.pairs:
                dtype = target.infos[p.target_key].dtype  # from the header: no second read
                w.write(p.aux_weight_key, p.transform.read(a, p.aux_keys, dtype, buf))
                w.write(p.scale_key, torch.full(p.scale_shape, float(init_scale), dtype=torch.float32))
        patch = {ph: job.result() for ph, job in (digests or {}).items()}
        result = w.commit(patch=patch)
        for ph, digest in patch.items():
            metadata = {k: v.replace(ph, digest) for k, v in metadata.items()}
        return PairedWrite(result, metadata)
