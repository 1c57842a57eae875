"""A reference ViT with timm's key names, so timm `VisionTransformer` checkpoints load into it strictly.

It exists so that mmsurgery can build, train, fold and verify a ViT without timm installed. The forward
follows timm's (pre-norm blocks, fused `qkv` with rows [q; k; v] and heads contiguous, LayerNorm eps 1e-6,
exact-erf GELU, `scaled_dot_product_attention`, cls-token pooling). Every linear is called as a module
(`self.qkv(x)`), which reads `.weight`, so a parametrization on the weight (the pathway) is always seen.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsurgery.errors import BadInputError
from mmsurgery.layout.timm_vit import NO_WEIGHT_DECAY, block_linear_names, timm_vit_fields
from mmsurgery.paired_format import VIT_INFERRED, VIT_KEY, metadata_json

__all__ = [
    "METADATA_KEY",
    "ViTConfig",
    "VisionTransformer",
    "config_from_state_dict",
    "inferred_fields",
    "vit_base",
    "vit_from_checkpoint",
    "vit_large",
    "vit_small",
    "vit_tiny",
]

log = logging.getLogger(__name__)

METADATA_KEY = VIT_KEY
"""Safetensors metadata key holding `ViTConfig.to_dict()` as JSON (the only way to carry `num_heads`)."""


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to build a `VisionTransformer`; `mlp_hidden=None` means 4 × `embed_dim`."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int | None = None
    num_classes: int = 1000
    qkv_bias: bool = True
    gelu_approximate: str = "none"

    def __post_init__(self) -> None:
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", 4 * self.embed_dim)
        for field in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_hidden"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"ViTConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ViTConfig:
        """Build from `to_dict()` output (or the `mmsurgery.vit` JSON, whose `inferred` list is not a field); unknown
        keys are an error so a typo cannot be silently dropped."""
        data = {k: v for k, v in data.items() if k != VIT_INFERRED}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"unknown ViTConfig fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"invalid ViT config {dict(data)}: {exc}") from exc


def vit_tiny(**overrides: Any) -> ViTConfig:
    return dataclasses.replace(ViTConfig(embed_dim=192, depth=12, num_heads=3), **overrides)


def vit_small(**overrides: Any) -> ViTConfig:
    return dataclasses.replace(ViTConfig(embed_dim=384, depth=12, num_heads=6), **overrides)


def vit_base(**overrides: Any) -> ViTConfig:
    return dataclasses.replace(ViTConfig(embed_dim=768, depth=12, num_heads=12), **overrides)


def vit_large(**overrides: Any) -> ViTConfig:
    return dataclasses.replace(ViTConfig(embed_dim=1024, depth=24, num_heads=16), **overrides)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        assert cfg.mlp_hidden is not None
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.act = nn.GELU(approximate=cfg.gelu_approximate)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm-compatible ViT (cls token, learned pos-embed including the cls position, no dropout)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, d))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head: nn.Module = nn.Linear(d, config.num_classes) if config.num_classes else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-like init: truncated normal (std 0.02) linears and pos-embed, zero biases, tiny cls token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters timm exempts from weight decay (honoured by `mmsurgery.pathway.param_groups`)."""
        return set(NO_WEIGHT_DECAY)

    def block_linear_names(self) -> list[str]:
        """Module paths of the four linears per block that carry a pathway in M2PT, in block order."""
        return block_linear_names(len(self.blocks))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(int(v) for v in value)


def _default_heads(embed_dim: int) -> int:
    return max(1, embed_dim // 64)


def config_from_state_dict(
    state: Mapping[str, Tensor] | Mapping[str, Sequence[int]],
    num_heads: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ViTConfig:
    """Infer a `ViTConfig` from the shapes of a timm-named ViT state dict (tensors or name → shape).

    Shapes give patch size and channels (`patch_embed.proj.weight`), image size (the square patch grid of
    `pos_embed`), depth (block indices), MLP width (`fc1`), `qkv_bias` and `num_classes` (`head.weight`, 0 if
    absent). Keys of other kinds (a pathway's `aux_weight`/`cross_modal_scale`) are ignored.

    The head count is not in the weights. It comes from `num_heads`, else from the `mmsurgery.vit` metadata
    JSON (which also gives `gelu_approximate` and must agree with the shapes), else from the rule
    `num_heads = max(1, embed_dim // 64)` (head dim 64): right for timm's ViT-Ti/S/B/L (192→3, 384→6, 768→12,
    1024→16), WRONG for ViT-H/14 (1280 → 20, but timm uses 16) and giant variants; pass `num_heads` for those.
    """
    shapes = {k: _shape(v) for k, v in state.items()}
    inferred = timm_vit_fields(shapes)
    meta_cfg: dict[str, Any] = {}
    meta = metadata_json(metadata or {}, METADATA_KEY)  # bounded: a damaged value is one BadInputError
    if meta is not None:
        if not isinstance(meta, dict):
            raise BadInputError(f"metadata '{METADATA_KEY}' is not a JSON object but {_shown(meta)}")
        meta_cfg = meta
        clashes = {k: (_shown(meta_cfg[k]), v) for k, v in inferred.items() if k in meta_cfg and meta_cfg[k] != v}
        if clashes:
            raise BadInputError(
                f"metadata '{METADATA_KEY}' disagrees with the tensor shapes (metadata, shapes): {clashes}"
            )
    if num_heads is None:
        num_heads = meta_cfg.get("num_heads")
        if num_heads is not None and (type(num_heads) is not int or num_heads < 1):
            raise BadInputError(
                f"metadata '{METADATA_KEY}' has num_heads {_shown(num_heads)}, not a positive integer; pass num_heads"
            )
    if num_heads is None:
        num_heads = _default_heads(inferred["embed_dim"])
        log.info("num_heads=%d from the head-dim-64 rule (embed_dim %d)", num_heads, inferred["embed_dim"])
    fields = {**inferred, "num_heads": num_heads, "gelu_approximate": meta_cfg.get("gelu_approximate", "none")}
    try:
        return ViTConfig(**fields)
    except (TypeError, ValueError) as exc:  # TypeError: a metadata value of the wrong type
        raise BadInputError(f"cannot build a ViT from this state dict: {exc}; pass num_heads") from exc


def _shown(value: Any) -> Any:
    """A metadata value for a one-line message: a number, bool, null or short string as it is, anything else
    (a list, an object, a long string) by its kind, so that no message repeats a damaged value at length."""
    if value is None or (type(value) in (int, float, bool) and len(repr(value)) <= 30):
        return value
    if isinstance(value, str) and len(value) <= 40:
        return value
    kinds = {dict: "an object", list: "a list", str: "a long string", int: "a huge number"}
    return f"<{kinds.get(type(value), type(value).__name__)}>"


def inferred_fields(num_heads: int | None, metadata: Mapping[str, str] | None) -> tuple[str, ...]:
    """The config fields `config_from_state_dict(..., num_heads, metadata)` guesses rather than learns: `num_heads`
    unless it is given or the `mmsurgery.vit` metadata records it without listing it in its `inferred` list (what
    `pair` writes when it applied the head-dim-64 rule); () when nothing is guessed. Metadata it cannot read counts
    as none, and an `inferred` entry that is not a list as listing everything (`config_from_state_dict` reports
    unreadable JSON)."""
    if num_heads is not None:
        return ()
    try:
        meta = metadata_json(metadata or {}, METADATA_KEY)
    except BadInputError:
        return ("num_heads",)
    if not isinstance(meta, dict) or meta.get("num_heads") is None:
        return ("num_heads",)
    guessed = meta.get(VIT_INFERRED, [])
    return ("num_heads",) if not isinstance(guessed, list) or "num_heads" in guessed else ()


def vit_from_checkpoint(
    state: Mapping[str, Tensor], num_heads: int | None = None, metadata: Mapping[str, str] | None = None
) -> VisionTransformer:
    """Build a `VisionTransformer` from a timm-named state dict and load it strictly (every key, every shape)."""
    model = VisionTransformer(config_from_state_dict(state, num_heads=num_heads, metadata=metadata))
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise BadInputError(f"the state dict does not load strictly into the reference ViT: {exc}") from exc
    return model
