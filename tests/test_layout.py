"""Structure detection on a tiny fixture per family, and on the real MiniLM."""

from __future__ import annotations

import pytest
from families import CASES, D, H

from mmsurgery.checkpoint import TensorInfo, open_checkpoint
from mmsurgery.checkpoint.dtypes import torch_dtype_name
from mmsurgery.layout import FAMILIES, choose_stack, default_stack, detect
from mmsurgery.layout.families import Family, validate


def infos_of(sd) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, torch_dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_family_detection(case) -> None:
    layout = detect(infos_of(case.build()))
    s = default_stack(layout)
    assert s is not None, [x.prefix for x in layout.stacks]
    got = (s.prefix, s.family, s.depth, s.width, s.mlp_width, s.qkv, s.norm, s.orientation)
    want = (case.prefix, case.family, case.depth, case.width, case.mlp_width, case.qkv, case.norm, case.orientation)
    assert got == want
    for prefix, fields in case.others.items():
        other = layout.stack(prefix)
        for name, value in fields.items():
            assert getattr(other, name) == value, (prefix, name)


def test_roles_of_a_timm_block_and_conv1d_orientation() -> None:
    from families import gpt2_block, stack, timm_block

    s = default_stack(detect(infos_of(stack("blocks", 2, timm_block(qkv_bias=False)))))
    b = s.blocks[1]
    assert [lin.role for lin in b.linears] == ["qkv", "attn_out", "mlp_in", "mlp_out"]
    assert b.get("qkv").key == "blocks.1.attn.qkv.weight" and b.get("qkv").bias is None
    assert b.get("mlp_in").bias == "blocks.1.mlp.fc1.bias"
    assert s.bias == "partial"
    g = default_stack(detect(infos_of(stack("h", 1, gpt2_block()))))
    qkv = g.blocks[0].get("qkv")
    assert qkv.shape == (D, 3 * D) and (qkv.out_features, qkv.in_features) == (3 * D, D)
    assert g.blocks[0].get("mlp_in").out_features == H


def test_gated_mlp_is_recognised_not_pairable() -> None:
    from families import CASES_BY_NAME, stack, timm_block

    s = default_stack(detect(infos_of(CASES_BY_NAME["eva02-swiglu"].build())))
    assert s.gated_mlp and {lin.role for lin in s.blocks[0].linears} == {"q", "k", "v", "attn_out", "mlp_gated"}
    packed = timm_block() | {"mlp.fc1.weight": (2 * H, D), "mlp.fc1.bias": (2 * H,)}
    p = default_stack(detect(infos_of(stack("blocks", 1, packed))))
    assert p.gated_mlp and p.blocks[0].get("mlp_in") is None and p.mlp_width == H


def test_shape_fallback_when_names_say_nothing() -> None:
    from families import stack

    spec = {"ln_a.weight": (D,), "ln_b.weight": (D,), "wqkv.weight": (3 * D, D), "wo.weight": (D, D)}
    spec |= {"up.weight": (H, D), "down.weight": (D, H)}
    s = detect(infos_of(stack("layers", 2, spec))).stacks[0]
    assert s.family == "by-shape"
    assert {lin.role: lin.key.split(".")[-2] for lin in s.blocks[0].linears} == {
        "qkv": "wqkv",
        "mlp_in": "up",
        "mlp_out": "down",
    }  # the square `wo` is ambiguous and left alone


def test_decoder_stack_not_matched_as_encoder_and_mae_regex_trap() -> None:
    from families import CASES_BY_NAME

    layout = detect(infos_of(CASES_BY_NAME["mae-pretrain"].build()))
    assert sorted(s.prefix for s in layout.stacks) == ["blocks", "decoder_blocks"]


def test_ambiguous_stacks_need_a_name() -> None:
    from families import CASES_BY_NAME

    sd = CASES_BY_NAME["hf-clip"].build()
    sd = {k: v for k, v in sd.items() if not k.startswith("vision_model.encoder.layers.2.")}  # now equal sizes
    layout = detect(infos_of(sd))
    assert default_stack(layout) is None
    with pytest.raises(Exception, match="several candidate stacks"):
        choose_stack(layout)
    assert choose_stack(layout, "text_model.encoder.layers").depth == 2


def test_minilm_real_weights(minilm_path) -> None:
    with open_checkpoint(minilm_path) as ck:
        layout = detect(ck.infos)
    (s,) = layout.stacks
    assert (s.prefix, s.depth, s.width, s.mlp_width, s.qkv, s.norm, s.family) == (
        "encoder.layer",
        6,
        384,
        1536,
        "split",
        "post",
        "bert",
    )
    assert [lin.role for lin in s.blocks[0].linears] == ["q", "k", "v", "attn_out", "mlp_in", "mlp_out"]
    assert s.bias == "all"


def test_family_table_validation_rejects_bad_entries() -> None:
    validate()
    bad = Family("x", "", ("blocks",), {"qkv": "a", "attn_out": "b", "mlp_in": "c", "mlp_out": "d", "zzz": "e"})
    with pytest.raises(ValueError, match="unknown roles"):
        validate((*FAMILIES, bad))
    with pytest.raises(ValueError, match="duplicate"):
        validate((*FAMILIES, FAMILIES[0]))
    no_qkv = Family("y", "", ("blocks",), {"attn_out": "b", "mlp_in": "c", "mlp_out": "d"})
    with pytest.raises(ValueError, match="qkv"):
        validate((no_qkv,))
