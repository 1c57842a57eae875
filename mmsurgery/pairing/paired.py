"""Writing the paired checkpoint: every target tensor unchanged, plus `<linear>.aux_weight` (already in the
target's layout and dtype) and `<linear>.cross_modal_scale` (λ) per paired linear, streamed one tensor at a time.

Those key names are what `model.state_dict()` shows with the pathway attached (mmsurgery.pathway), and the
names M2PT's own `CrossModalReparamLinear` saves, so the file loads with a strict `load_state_dict`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsurgery import __version__
from mmsurgery.checkpoint.dtypes import ITEMSIZE
from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.loaded import Checkpoint, TensorInfo
from mmsurgery.checkpoint.pins import check_regular
from mmsurgery.checkpoint.writer import SafetensorsWriter, WriteResult
from mmsurgery.errors import BadInputError
from mmsurgery.hf import CONFIG_NAME
from mmsurgery.layout.timm_vit import patch_embed_width
from mmsurgery.paired_format import VIT_INFERRED, VIT_KEY, paired_metadata, provenance_keys
from mmsurgery.pairing.plan import Plan

__all__ = ["PairedWrite", "VitRecord", "default_output", "vit_metadata", "write_paired"]

log = logging.getLogger(__name__)

HEAD_RULE = "the head-dim-64 rule"


@dataclass(frozen=True, kw_only=True)
class VitRecord:
    """The built-in ViT configuration `pair` records as `mmsurgery.vit`, and where its head count came from (the one
    field the weights do not give). `inferred` names the fields guessed rather than learned: the JSON lists them
    under `inferred`, and verify refuses to keep an exported graph of such a configuration (docs/verify.md)."""

    config: Mapping[str, Any]  # ViTConfig.to_dict()
    heads_from: str  # "--heads", "the target's mmsurgery.vit metadata", a config.json path, or HEAD_RULE
    inferred: tuple[str, ...] = ()

    def to_metadata(self) -> str:
        """The `mmsurgery.vit` value: the config's JSON, plus `"inferred": [...]` when something was guessed."""
        data = dict(self.config)
        if self.inferred:
            data[VIT_INFERRED] = list(self.inferred)
        return json.dumps(data)

    def to_json(self) -> dict[str, Any]:
        return {"config": dict(self.config), "heads_from": self.heads_from, "inferred": list(self.inferred)}


@dataclass(frozen=True, kw_only=True)
class PairedWrite:
    result: WriteResult
    metadata: dict[str, str]
    vit: VitRecord | None = None


def default_output(target: Path) -> Path:
    """`<target stem>.paired.safetensors` beside the target (`model.safetensors.index.json` -> `model.paired...`)."""
    name = target.name.removesuffix(".index.json")
    return target.with_name(Path(name).stem + ".paired.safetensors")


def vit_metadata(target: Checkpoint, heads: int | None) -> VitRecord | None:
    """The built-in ViT config of a timm-named ViT target; None when the target is not such a ViT. Its head count is
    `heads`, else the target's own `mmsurgery.vit` metadata (unless that marks it inferred), else a `config.json`
    beside the target that states it (`config_heads`), else the head-dim-64 rule of
    `models.vit.config_from_state_dict`, and then the record says it was inferred."""
    from mmsurgery.models.vit import config_from_state_dict, inferred_fields

    shapes = {name: info.shape for name, info in target.infos.items()}
    heads_from = "--heads"
    found = heads
    if found is None and not inferred_fields(None, target.metadata):
        heads_from = f"the target's {VIT_KEY} metadata"
    elif found is None and (width := patch_embed_width(shapes)) is not None:
        stated = config_heads(Path(target.path), width)
        if stated is not None:
            found, where = stated
            heads_from = str(where)
    try:
        config = config_from_state_dict(shapes, num_heads=found, metadata=target.metadata)
    except BadInputError:
        if heads is not None:
            raise
        return None
    inferred = inferred_fields(found, target.metadata)
    if inferred:
        marked = VIT_KEY in target.metadata
        heads_from = f"the target's {VIT_KEY} metadata, which marks it inferred" if marked else HEAD_RULE
    return VitRecord(config=config.to_dict(), heads_from=heads_from, inferred=inferred)


_HEADS_FIELDS = ("num_attention_heads", "num_heads")  # transformers' configs; timm's `model_args`
_WIDTH_FIELDS = ("hidden_size", "embed_dim", "num_features")


def config_heads(target: Path, embed_dim: int) -> tuple[int, Path] | None:
    """The head count a Hugging Face `config.json` in the target's folder states (`num_attention_heads` or
    `num_heads`, at the top level or in timm's `model_args`), and that file; None when there is no such file, it
    states none, or it describes another width (a config of some other model in the same folder)."""
    folder = target if target.is_dir() else target.parent
    path = folder / CONFIG_NAME
    if os.path.exists(path):
        check_regular(path)  # a FIFO would block the read forever: refused, naming it
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    for part in (data, data.get("model_args") if isinstance(data, dict) else None):
        if not isinstance(part, dict):
            continue
        widths = [part[f] for f in _WIDTH_FIELDS if isinstance(part.get(f), int)]
        heads = next((part[f] for f in _HEADS_FIELDS if isinstance(part.get(f), int)), None)
        if heads is None or isinstance(heads, bool) or heads < 1:
            continue
        if any(w != embed_dim for w in widths) or embed_dim % heads:
            log.info("%s: %d heads for width %s, not this target's %d: not used", path, heads, widths, embed_dim)
            continue
        return heads, path
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
    digests: Sequence[HashJob] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PairedWrite:
    """Stream the paired checkpoint to `out`: the target's tensors, then per auxiliary (one plan and one
    checkpoint each, in order) its `aux_weight` and `cross_modal_scale` per paired linear. `digests` are the hash
    jobs of the inputs (the target's, then each auxiliary's) whose results go under `provenance_keys` in the
    header at commit; `extra_files`
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
            specs.append(
                TensorInfo(p.cross_modal_scale_key, "float32", p.scale_shape)
            )  # λ stays float32, as the pathway keeps it
    if digests is not None and len(digests) != 1 + len(plans):
        raise ValueError(f"{len(digests)} hash jobs for a target and {len(plans)} auxiliaries")
    vit = vit_metadata(target, heads)
    metadata = paired_metadata(
        target.metadata,
        plans=[pl.dumps() for pl in plans],
        scale_mode=plans[0].scale_mode,
        init_scale=init_scale,
        vit=vit.to_metadata() if vit is not None else None,
        version=__version__,
        digests=digests is not None,
    )
    inputs = [target.path, *target.files, *(f for a in auxes for f in (a.path, *a.files))]  # an index is an input too
    inputs += [c.folder for c in (target, *auxes) if c.folder is not None]  # and a folder: no output goes inside
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
                w.write(p.cross_modal_scale_key, torch.full(p.scale_shape, float(init_scale), dtype=torch.float32))
        patch = (
            dict(zip(provenance_keys(len(plans)), (job.result() for job in digests), strict=True)) if digests else {}
        )
        result = w.commit(patch=patch)
        return PairedWrite(result=result, metadata=metadata | patch, vit=vit)
