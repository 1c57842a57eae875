"""Tiny, test-built state dicts in the real key layout of each checkpoint family
(../shared/reference/checkpoint-families.md), with what detection must find in each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

D, H = 16, 64  # width and MLP width of every fixture block


def _t(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * 0.02


def block(prefix: str, spec: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": _t(*shape, gen=gen) for k, shape in spec.items()}


def stack(prefix: str, depth: int, spec: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(depth):
        out |= block(f"{prefix}.{i}", spec, gen)
    return out


def timm_block(d: int = D, h: int = H, qkv_bias: bool = True) -> dict[str, tuple[int, ...]]:
    spec: dict[str, tuple[int, ...]] = {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (h, d),
        "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h),
        "mlp.fc2.bias": (d,),
    }
    if qkv_bias:
        spec["attn.qkv.bias"] = (3 * d,)
    return spec


def _split(prefix: str, names: tuple[str, str, str], d: int, biases: tuple[bool, bool, bool] = (True,) * 3):
    spec: dict[str, tuple[int, ...]] = {}
    for name, b in zip(names, biases, strict=True):
        spec[f"{prefix}.{name}.weight"] = (d, d)
        if b:
            spec[f"{prefix}.{name}.bias"] = (d,)
    return spec


def hf_vit_block(d: int = D, h: int = H) -> dict[str, tuple[int, ...]]:
    return {
        **_split("attention.attention", ("query", "key", "value"), d),
        "attention.output.dense.weight": (d, d),
        "attention.output.dense.bias": (d,),
        "intermediate.dense.weight": (h, d),
        "intermediate.dense.bias": (h,),
        "output.dense.weight": (d, h),
        "output.dense.bias": (d,),
        "layernorm_before.weight": (d,),
        "layernorm_before.bias": (d,),
        "layernorm_after.weight": (d,),
        "layernorm_after.bias": (d,),
    }


def hf_vit_v5_block(d: int = D, h: int = H) -> dict[str, tuple[int, ...]]:
    return {
        **_split("attention", ("q_proj", "k_proj", "v_proj"), d),
        "attention.o_proj.weight": (d, d),
        "layernorm_before.weight": (d,),
        "mlp.fc1.weight": (h, d),
        "mlp.fc2.weight": (d, h),
        "layernorm_after.weight": (d,),
    }


def bert_block(d: int = D, h: int = H) -> dict[str, tuple[int, ...]]:
    return {
        **_split("attention.self", ("query", "key", "value"), d),
        "attention.output.dense.weight": (d, d),
        "attention.output.dense.bias": (d,),
        "attention.output.LayerNorm.weight": (d,),
        "attention.output.LayerNorm.bias": (d,),
        "intermediate.dense.weight": (h, d),
        "intermediate.dense.bias": (h,),
        "output.dense.weight": (d, h),
        "output.dense.bias": (d,),
        "output.LayerNorm.weight": (d,),
        "output.LayerNorm.bias": (d,),
    }


def gpt2_block(d: int = D, h: int = H) -> dict[str, tuple[int, ...]]:
    return {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d),
        "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, h),
        "mlp.c_fc.bias": (h,),
        "mlp.c_proj.weight": (h, d),
        "mlp.c_proj.bias": (d,),
    }


def vit_extras(d: int = D, n: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {
        "cls_token": _t(1, 1, d, gen=g),
        "pos_embed": _t(1, n, d, gen=g),
        "patch_embed.proj.weight": _t(d, 3, 4, 4, gen=g),
        "patch_embed.proj.bias": _t(d, gen=g),
        "norm.weight": _t(d, gen=g),
        "norm.bias": _t(d, gen=g),
    }


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], dict[str, torch.Tensor]]
    prefix: str  # the default stack
    family: str
    depth: int
    qkv: str
    norm: str
    width: int = D
    mlp_width: int | None = H
    orientation: str = "linear"
    others: dict[str, dict[str, object]] = field(default_factory=dict)  # other stacks: prefix -> expected fields
    wrapper: Callable[[dict[str, torch.Tensor]], object] | None = None  # how the file wraps it (for .pt)


def _clip_openai() -> dict[str, torch.Tensor]:
    spec = {
        "ln_1.weight": (D,),
        "attn.in_proj_weight": (3 * D, D),
        "attn.in_proj_bias": (3 * D,),
        "attn.out_proj.weight": (D, D),
        "attn.out_proj.bias": (D,),
        "ln_2.weight": (D,),
        "mlp.c_fc.weight": (H, D),
        "mlp.c_fc.bias": (H,),
        "mlp.c_proj.weight": (D, H),
        "mlp.c_proj.bias": (D,),
    }
    wide = {k: tuple(2 * s for s in v) if "in_proj_weight" not in k else (6 * D, 2 * D) for k, v in spec.items()}
    return stack("visual.transformer.resblocks", 3, wide) | stack("transformer.resblocks", 2, spec, 1)


def _hf_clip() -> dict[str, torch.Tensor]:
    spec = {
        **_split("self_attn", ("q_proj", "k_proj", "v_proj"), D),
        "self_attn.out_proj.weight": (D, D),
        "layer_norm1.weight": (D,),
        "mlp.fc1.weight": (H, D),
        "mlp.fc2.weight": (D, H),
        "layer_norm2.weight": (D,),
    }
    return stack("vision_model.encoder.layers", 3, spec) | stack("text_model.encoder.layers", 2, spec, 1)


def _whisper_hf() -> dict[str, torch.Tensor]:
    spec = {
        **_split("self_attn", ("q_proj", "k_proj", "v_proj"), D, (True, False, True)),
        "self_attn.out_proj.weight": (D, D),
        "self_attn_layer_norm.weight": (D,),
        "fc1.weight": (H, D),
        "fc2.weight": (D, H),
        "final_layer_norm.weight": (D,),
    }
    dec = spec | _split("encoder_attn", ("q_proj", "k_proj", "v_proj"), D)
    return stack("model.encoder.layers", 2, spec) | stack("model.decoder.layers", 2, dec, 1)


def _whisper_openai() -> dict[str, torch.Tensor]:
    spec = {
        **_split("attn", ("query", "key", "value"), D, (True, False, True)),
        "attn.out.weight": (D, D),
        "attn_ln.weight": (D,),
        "mlp.0.weight": (H, D),
        "mlp.0.bias": (H,),
        "mlp.2.weight": (D, H),
        "mlp_ln.weight": (D,),
    }
    return stack("encoder.blocks", 2, spec) | stack("decoder.blocks", 2, spec, 1)


def _wav2vec2() -> dict[str, torch.Tensor]:
    spec = {
        **_split("attention", ("q_proj", "k_proj", "v_proj"), D),
        "attention.out_proj.weight": (D, D),
        "layer_norm.weight": (D,),
        "feed_forward.intermediate_dense.weight": (H, D),
        "feed_forward.output_dense.weight": (D, H),
        "final_layer_norm.weight": (D,),
    }
    return stack("wav2vec2.encoder.layers", 3, spec) | {"wav2vec2.masked_spec_embed": torch.zeros(D)}


def _beit() -> dict[str, torch.Tensor]:
    spec = timm_block(qkv_bias=False) | {"attn.q_bias": (D,), "attn.v_bias": (D,), "gamma_1": (D,), "gamma_2": (D,)}
    return stack("blocks", 2, spec) | vit_extras()


def _eva02() -> dict[str, torch.Tensor]:
    spec = {
        **_split("attn", ("q_proj", "k_proj", "v_proj"), D, (True, False, True)),
        "attn.proj.weight": (D, D),
        "norm1.weight": (D,),
        "mlp.fc1_g.weight": (H, D),
        "mlp.fc1_x.weight": (H, D),
        "mlp.norm.weight": (H,),
        "mlp.fc2.weight": (D, H),
        "norm2.weight": (D,),
    }
    return stack("blocks", 2, spec) | vit_extras()


def _dinov2_chunked() -> dict[str, torch.Tensor]:
    spec = timm_block() | {"ls1.gamma": (D,), "ls2.gamma": (D,)}
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i in range(4):
        out |= block(f"blocks.{i // 2}.{i}", spec, gen)
    return out | vit_extras() | {"mask_token": torch.zeros(1, D)}


CASES: tuple[Case, ...] = (
    Case("timm-vit", lambda: stack("blocks", 3, timm_block()) | vit_extras(), "blocks", "timm-vit", 3, "fused", "pre"),
    Case(
        "timm-train-ckpt",
        lambda: stack("blocks", 2, timm_block()) | vit_extras(),
        "blocks",
        "timm-vit",
        2,
        "fused",
        "pre",
        wrapper=lambda sd: {"state_dict": sd, "epoch": 3, "arch": "vit_tiny", "optimizer": {"state": {}}},
    ),
    Case(
        "mae-pretrain",
        lambda: stack("blocks", 3, timm_block()) | stack("decoder_blocks", 2, timm_block(8, 32), 1) | vit_extras(),
        "blocks",
        "timm-vit",
        3,
        "fused",
        "pre",
        others={"decoder_blocks": {"decoder": True, "width": 8}},
        wrapper=lambda sd: {"model": sd, "epoch": 400},
    ),
    Case("beit", _beit, "blocks", "timm-vit", 2, "fused", "pre"),
    Case("eva02-swiglu", _eva02, "blocks", "timm-vit", 2, "split", "pre"),
    Case("dinov2-chunked", _dinov2_chunked, "blocks", "timm-vit", 4, "fused", "pre"),
    Case(
        "point-mae",
        lambda: (
            stack("MAE_encoder.blocks.blocks", 3, timm_block(qkv_bias=False))
            | stack("MAE_decoder.blocks", 2, timm_block(qkv_bias=False), 1)
        ),
        "MAE_encoder.blocks.blocks",
        "timm-vit",
        3,
        "fused",
        "pre",
        others={"MAE_decoder.blocks": {"decoder": True}},
        wrapper=lambda sd: {"base_model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 300},
    ),
    Case(
        "point-bert",
        lambda: (
            stack("transformer_q.blocks.blocks", 2, timm_block(qkv_bias=False))
            | stack("transformer_k.blocks.blocks", 2, timm_block(qkv_bias=False), 1)
        ),
        "transformer_q.blocks.blocks",
        "timm-vit",
        2,
        "fused",
        "pre",
        others={"transformer_k.blocks.blocks": {"ema": True}},
    ),
    Case(
        "videomae-pretrain",
        lambda: (
            stack("encoder.blocks", 2, timm_block(qkv_bias=False) | {"attn.q_bias": (D,), "attn.v_bias": (D,)})
            | stack("decoder.blocks", 2, timm_block(8, 32), 1)
        ),
        "encoder.blocks",
        "timm-vit",
        2,
        "fused",
        "pre",
        others={"decoder.blocks": {"decoder": True}},
    ),
    Case(
        "hf-vit",
        lambda: stack("vit.encoder.layer", 3, hf_vit_block()),
        "vit.encoder.layer",
        "hf-vit",
        3,
        "split",
        "pre",
    ),
    Case("hf-vit-v5", lambda: stack("vit.layers", 2, hf_vit_v5_block()), "vit.layers", "hf-vit-v5", 2, "split", "pre"),
    Case(
        "hf-vitmae",
        lambda: stack("vit.encoder.layer", 2, hf_vit_block()) | stack("decoder.decoder_layers", 2, hf_vit_block(8, 32)),
        "vit.encoder.layer",
        "hf-vit",
        2,
        "split",
        "pre",
        others={"decoder.decoder_layers": {"decoder": True}},
    ),
    Case(
        "ast",
        lambda: stack("audio_spectrogram_transformer.encoder.layer", 2, hf_vit_block()),
        "audio_spectrogram_transformer.encoder.layer",
        "hf-vit",
        2,
        "split",
        "pre",
    ),
    Case(
        "bert", lambda: stack("bert.encoder.layer", 2, bert_block()), "bert.encoder.layer", "bert", 2, "split", "post"
    ),
    Case(
        "hf-clip",
        _hf_clip,
        "vision_model.encoder.layers",
        "hf-clip",
        3,
        "split",
        "pre",
        others={"text_model.encoder.layers": {"decoder": False}},
    ),
    Case(
        "openai-clip",
        _clip_openai,
        "visual.transformer.resblocks",
        "openai-clip",
        3,
        "fused",
        "pre",
        width=2 * D,
        mlp_width=2 * H,
        others={"transformer.resblocks": {"width": D}},
    ),
    Case(
        "hf-whisper",
        _whisper_hf,
        "model.encoder.layers",
        "hf-whisper",
        2,
        "split",
        "pre",
        others={"model.decoder.layers": {"decoder": True}},
    ),
    Case(
        "openai-whisper",
        _whisper_openai,
        "encoder.blocks",
        "openai-whisper",
        2,
        "split",
        "pre",
        others={"decoder.blocks": {"decoder": True}},
        wrapper=lambda sd: {"dims": {"n_audio_state": D}, "model_state_dict": sd},
    ),
    Case("wav2vec2", _wav2vec2, "wav2vec2.encoder.layers", "wav2vec2", 3, "split", "unknown"),
    Case(
        "gpt2",
        lambda: stack("transformer.h", 2, gpt2_block()) | {"transformer.wte.weight": torch.zeros(50, D)},
        "transformer.h",
        "gpt2",
        2,
        "fused",
        "pre",
        orientation="conv1d",
    ),
)
CASES_BY_NAME = {c.name: c for c in CASES}
