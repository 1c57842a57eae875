"""The timm ViT's key names, and what its shapes say about the model (`models.vit` builds it from these).

`patch_embed.proj.weight` gives patch size, channels and width; `pos_embed` the square patch grid; `blocks.N.`
the depth; `blocks.0.mlp.fc1.weight` the MLP width; `head.weight` the classes; `blocks.0.attn.qkv.bias` whether
qkv has a bias. Pure functions over name → shape mappings: no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mmsurgery.errors import BadInputError

__all__ = ["BLOCK_LINEARS", "NO_WEIGHT_DECAY", "block_linear_names", "patch_embed_width", "timm_vit_fields"]

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # the four linears per block M2PT paths
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")  # the parameters timm exempts from weight decay
_PATCH_EMBED = "patch_embed.proj.weight"
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def block_linear_names(depth: int) -> list[str]:
    """Module paths of the four pathway linears per block, in block order."""
    return [f"blocks.{i}.{name}" for i in range(depth) for name in BLOCK_LINEARS]


def patch_embed_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The width a timm-named ViT's patch embedding gives, or None when there is none (not a timm ViT)."""
    shape = shapes.get(_PATCH_EMBED)
    return int(shape[0]) if shape else None


def timm_vit_fields(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The config fields a timm-named ViT's shapes determine (all but the head count). Keys of other kinds (a
    pathway's `aux_weight`/`cross_modal_scale`) are ignored. Raises `BadInputError` for anything else."""
    for key in (_PATCH_EMBED, *NO_WEIGHT_DECAY, "norm.weight"):
        if key not in shapes:
            raise BadInputError(f"not a timm-style ViT state dict: '{key}' is missing")
    embed_dim, in_chans, patch_h, patch_w = shapes[_PATCH_EMBED]
    if patch_h != patch_w:
        raise BadInputError(f"non-square patches {patch_h}x{patch_w} are not supported")
    n_tokens = shapes["pos_embed"][1]
    grid = math.isqrt(n_tokens - 1)
    if grid * grid != n_tokens - 1:
        raise BadInputError(f"pos_embed has {n_tokens} positions; expected 1 cls position + a square patch grid")
    block_ids = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    if not block_ids or block_ids != set(range(len(block_ids))):
        raise BadInputError(f"block indices must be 0..depth-1, found {sorted(block_ids)}")
    if "blocks.0.mlp.fc1.weight" not in shapes:
        raise BadInputError("not a timm-style ViT state dict: 'blocks.0.mlp.fc1.weight' is missing")
    head = shapes.get("head.weight")
    return {
        "img_size": grid * patch_h,
        "patch_size": patch_h,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": len(block_ids),
        "mlp_hidden": shapes["blocks.0.mlp.fc1.weight"][0],
        "num_classes": head[0] if head else 0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in shapes,
    }
