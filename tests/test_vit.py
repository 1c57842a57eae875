from __future__ import annotations

import json

import pytest
import torch
from pathway_fixtures import batch, tiny_config, tiny_vit

from mmsurgery.errors import BadInputError
from mmsurgery.models.vit import (
    METADATA_KEY,
    VisionTransformer,
    ViTConfig,
    config_from_state_dict,
    vit_from_checkpoint,
    vit_small,
)


def _timm_named_state(depth: int = 2, d: int = 32, hidden: int = 64, classes: int = 7) -> dict[str, torch.Tensor]:
    """Key names and shapes written out the way timm's VisionTransformer names them (img 16, patch 4)."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 17, d),
        "patch_embed.proj.weight": (d, 3, 4, 4),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
        }  # fmt: skip
    shapes |= {"norm.weight": (d,), "norm.bias": (d,), "head.weight": (classes, d), "head.bias": (classes,)}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def test_forward_shapes_and_headless() -> None:
    x, _ = batch()
    assert tiny_vit()(x).shape == (8, 5)
    assert tiny_vit(num_classes=0)(x).shape == (8, 32)
    with pytest.raises(ValueError, match="16x16"):
        tiny_vit()(torch.randn(1, 3, 20, 20))


def test_timm_named_state_dict_loads_strictly() -> None:
    state = _timm_named_state()
    model = vit_from_checkpoint(state, num_heads=4)
    assert model.config == tiny_config(num_heads=4, mlp_hidden=64, num_classes=7)
    assert list(model.state_dict()) == list(state)
    with pytest.raises(BadInputError, match="strictly"):
        vit_from_checkpoint({**state, "blocks.0.attn.extra": torch.zeros(1)}, num_heads=4)


def test_config_dict_round_trip() -> None:
    cfg = tiny_config(qkv_bias=False, gelu_approximate="tanh", mlp_hidden=48)
    assert ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ViTConfig(embed_dim=32, num_heads=2).mlp_hidden == 128
    with pytest.raises(BadInputError, match="unknown"):
        ViTConfig.from_dict({**cfg.to_dict(), "mlp_ratio": 4.0})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"qkv_bias": False, "num_classes": 0},
        {"in_chans": 1, "mlp_hidden": 40, "depth": 3, "patch_size": 8, "img_size": 32},
    ],
)
def test_config_from_state_dict_round_trip(overrides: dict) -> None:
    model = tiny_vit(**overrides)
    cfg = model.config
    state = model.state_dict()
    assert config_from_state_dict(state, num_heads=cfg.num_heads) == cfg
    shapes_only = {k: tuple(v.shape) for k, v in state.items()}
    meta = {METADATA_KEY: json.dumps(cfg.to_dict())}
    assert config_from_state_dict(shapes_only, metadata=meta) == cfg


def test_heads_rule_metadata_and_gelu_from_metadata() -> None:
    shapes = {k: tuple(v.shape) for k, v in VisionTransformer(vit_small(depth=1, img_size=32)).state_dict().items()}
    assert config_from_state_dict(shapes).num_heads == 6  # 384 // 64
    assert config_from_state_dict(shapes, num_heads=4).num_heads == 4
    tanh = tiny_config(gelu_approximate="tanh")
    meta = {METADATA_KEY: json.dumps(tanh.to_dict())}
    assert config_from_state_dict(VisionTransformer(tanh).state_dict(), metadata=meta) == tanh
    clash = {METADATA_KEY: json.dumps(tiny_config(depth=3).to_dict())}
    with pytest.raises(BadInputError, match="disagrees"):
        config_from_state_dict(VisionTransformer(tanh).state_dict(), metadata=clash)


def test_bad_state_dicts() -> None:
    state = tiny_vit().state_dict()
    with pytest.raises(BadInputError, match="pos_embed"):
        config_from_state_dict({**state, "pos_embed": torch.zeros(1, 16, 32)})
    with pytest.raises(BadInputError, match="patch_embed"):
        config_from_state_dict({k: v for k, v in state.items() if not k.startswith("patch_embed")})
    with pytest.raises(BadInputError, match="num_heads"):
        config_from_state_dict(state, num_heads=3)  # 32 is not divisible by 3


def test_vit_from_checkpoint_reproduces_the_model() -> None:
    # Exact: same weights, same code path.
    model = tiny_vit(seed=3)
    x, _ = batch()
    rebuilt = vit_from_checkpoint(model.state_dict(), num_heads=2).eval()
    assert torch.equal(rebuilt(x), model(x))
    assert not torch.equal(tiny_vit(seed=4)(x), model(x))


def test_gelu_variant_changes_the_output() -> None:
    x, _ = batch()
    exact, tanh = tiny_vit(), tiny_vit(gelu_approximate="tanh")
    tanh.load_state_dict(exact.state_dict())
    # GELU erf vs tanh differ by up to ~1e-3 per activation, so outputs must differ.
    assert not torch.equal(exact(x), tanh(x))
