"""`mmsurgery pair` across families: every decision numerically checked against the source tensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from families import CASES_BY_NAME, D, H, gpt2_block, hf_vit_block, stack, timm_block, vit_extras
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery.errors import PairingError
from mmsurgery.pairing import depth_map, pair


def save(tmp_path, name, sd):
    p = tmp_path / name
    save_file(sd, p)
    return p


def timm_vit(depth=3, d=D, h=H, seed=0, qkv_bias=True):
    return stack("blocks", depth, timm_block(d, h, qkv_bias), seed) | vit_extras(d)


def test_depth_policies() -> None:
    assert depth_map(12, 6, "stretch") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert depth_map(6, 12, "stretch") == [1, 3, 5, 7, 9, 11]
    assert depth_map(12, 4, "stretch") == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert depth_map(7, 7, "stretch") == list(range(7))
    assert depth_map(4, 2, "first") == [0, 1, None, None]
    assert depth_map(4, 2, "last") == [None, None, 0, 1]
    assert depth_map(2, 4, "last") == [2, 3]
    with pytest.raises(PairingError, match="equal depths"):
        depth_map(4, 2, "index")


def test_timm_from_timm_is_identity_copy(tmp_path) -> None:
    t, a = timm_vit(seed=0), timm_vit(seed=1)
    res = pair(save(tmp_path, "t.safetensors", t), save(tmp_path, "a.safetensors", a), tmp_path / "p.safetensors")
    assert res.plan.summary == "12 of 12 linears paired, 0 skipped; depth 3 <- 3 (stretch)"
    assert not any("several target blocks" in w for w in res.plan.warnings)  # 3 <- 3: each aux block used once
    out = load_file(res.output)
    for k, v in t.items():
        assert torch.equal(out[k], v)  # every target tensor unchanged
    assert torch.equal(out["blocks.2.mlp.fc2.aux_weight"], a["blocks.2.mlp.fc2.weight"])
    assert torch.equal(out["blocks.0.attn.qkv.cross_modal_scale"], torch.zeros(1))
    assert not torch.equal(out["blocks.0.attn.qkv.aux_weight"], out["blocks.0.attn.qkv.weight"])
    assert len(out) == len(t) + 2 * 12


def test_vit_small_from_real_minilm_fused_from_split(tmp_path, minilm_path) -> None:
    t = stack("blocks", 12, timm_block(384, 1536)) | vit_extras(384, 17)
    res = pair(save(tmp_path, "vit_s.safetensors", t), minilm_path)
    assert res.output == tmp_path / "vit_s.paired.safetensors"  # the default output, beside the target
    assert res.plan.summary == "48 of 48 linears paired, 0 skipped; depth 12 <- 6 (stretch)"
    assert res.plan.depth_map == (0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5)
    mini = load_file(minilm_path)
    with safe_open(res.output, "pt") as f:
        for i, j in ((0, 0), (7, 3), (11, 5)):
            q, k, v = (mini[f"encoder.layer.{j}.attention.self.{n}.weight"] for n in ("query", "key", "value"))
            assert torch.equal(f.get_tensor(f"blocks.{i}.attn.qkv.aux_weight"), torch.cat([q, k, v]))
            assert torch.equal(
                f.get_tensor(f"blocks.{i}.mlp.fc1.aux_weight"), mini[f"encoder.layer.{j}.intermediate.dense.weight"]
            )
            assert torch.equal(
                f.get_tensor(f"blocks.{i}.mlp.fc2.aux_weight"), mini[f"encoder.layer.{j}.output.dense.weight"]
            )
        meta = f.metadata()
    plan = json.loads(meta["mmsurgery.plan"])
    assert plan["aux"]["family"] == "bert" and plan["paired"] == 48
    # Provenance in its own fixed-width keys, patched by key at commit; the plan in the file holds no digest
    # (never a placeholder), the plan pair returns holds the same digests.
    assert meta["mmsurgery.aux_sha256"] == hashlib.sha256(minilm_path.read_bytes()).hexdigest()
    assert meta["mmsurgery.target_sha256"] == hashlib.sha256(Path(res.plan.target.path).read_bytes()).hexdigest()
    assert plan["aux"]["sha256"] is None and plan["target"]["sha256"] is None
    assert res.plan.aux.sha256 == meta["mmsurgery.aux_sha256"]
    assert res.plan.target.sha256 == meta["mmsurgery.target_sha256"]
    assert json.loads(meta["mmsurgery.vit"])["num_heads"] == 6  # the head-dim-64 rule for width 384
    assert any("post-norm" in w for w in plan["warnings"])
    assert any("several target blocks" in w for w in plan["warnings"])  # 12 <- 6: each aux block used twice


def test_hf_vit_split_from_timm_fused(tmp_path) -> None:
    t = stack("vit.encoder.layer", 2, hf_vit_block())
    a = timm_vit(depth=2, seed=5)
    res = pair(save(tmp_path, "hf.safetensors", t), save(tmp_path, "timm.safetensors", a), tmp_path / "p.safetensors")
    assert len(res.plan.pairs) == 2 * 6
    out = load_file(res.output)
    for part, name in enumerate(("query", "key", "value")):
        got = out[f"vit.encoder.layer.1.attention.attention.{name}.aux_weight"]
        assert torch.equal(got, a["blocks.1.attn.qkv.weight"].chunk(3)[part])
    assert torch.equal(out["vit.encoder.layer.0.output.dense.aux_weight"], a["blocks.0.mlp.fc2.weight"])


def test_vit_from_gpt2_conv1d_and_back(tmp_path) -> None:
    g = stack("h", 2, gpt2_block(), seed=3)
    v = timm_vit(depth=2)
    gp, vp = save(tmp_path, "gpt2.safetensors", g), save(tmp_path, "vit.safetensors", v)
    out = load_file(pair(vp, gp, tmp_path / "v.safetensors").output)
    assert torch.equal(out["blocks.1.attn.qkv.aux_weight"], g["h.1.attn.c_attn.weight"].t())
    assert torch.equal(out["blocks.0.mlp.fc1.aux_weight"], g["h.0.mlp.c_fc.weight"].t())
    assert torch.equal(out["blocks.0.mlp.fc2.aux_weight"], g["h.0.mlp.c_proj.weight"].t())
    back = load_file(pair(gp, vp, tmp_path / "g.safetensors").output)  # a Conv1D target keeps [in, out]
    assert torch.equal(back["h.1.attn.c_attn.aux_weight"], v["blocks.1.attn.qkv.weight"].t())
    assert back["h.0.mlp.c_fc.aux_weight"].shape == g["h.0.mlp.c_fc.weight"].shape


def test_point_mae_target_without_qkv_bias_from_wrapped_pickle(tmp_path) -> None:
    case = CASES_BY_NAME["point-mae"]
    sd = case.build()
    torch.save(case.wrapper(sd), tmp_path / "point.pth")
    a = timm_vit(seed=2)
    res = pair(tmp_path / "point.pth", save(tmp_path, "a.safetensors", a), tmp_path / "p.safetensors")
    assert res.plan.target.stack == "MAE_encoder.blocks.blocks" and len(res.plan.pairs) == 12
    out = load_file(res.output)
    assert "MAE_encoder.blocks.blocks.0.attn.qkv.bias" not in out
    assert torch.equal(out["MAE_encoder.blocks.blocks.0.attn.qkv.aux_weight"], a["blocks.0.attn.qkv.weight"])


def test_mae_pretrain_aux_decoder_is_ignored(tmp_path) -> None:
    case = CASES_BY_NAME["mae-pretrain"]
    torch.save(case.wrapper(case.build()), tmp_path / "mae.pth")
    res = pair(save(tmp_path, "t.safetensors", timm_vit()), tmp_path / "mae.pth", dry_run=True)
    assert res.plan.aux.stack == "blocks" and res.output is None
    assert all(not k.startswith("decoder") for p in res.plan.pairs for k in p.aux_keys)
    assert not (tmp_path / "t.paired.safetensors").exists()


def test_width_mismatch_is_skipped_and_reported_or_strict_error(tmp_path) -> None:
    t = timm_vit(depth=2)
    a = stack("blocks", 2, timm_block(D, 2 * H))  # attention matches, the MLP hidden width does not
    tp, ap = save(tmp_path, "t.safetensors", t), save(tmp_path, "a.safetensors", a)
    plan = pair(tp, ap, dry_run=True).plan
    assert plan.summary == "4 of 8 linears paired, 4 skipped; depth 2 <- 2 (stretch)"
    skip = next(s for s in plan.skips if s.target_key == "blocks.0.mlp.fc1.weight")
    assert skip.aux_keys == ("blocks.0.mlp.fc1.weight",) and skip.aux_shape == (2 * H, D)
    assert skip.target_shape == (H, D) and "out 64≠128" in skip.reason
    with pytest.raises(PairingError, match="--strict"):
        pair(tp, ap, dry_run=True, strict=True)
    wide = save(tmp_path, "w.safetensors", stack("blocks", 2, timm_block(2 * D, 2 * H)))
    with pytest.raises(PairingError, match="nothing paired"):
        pair(tp, wide, dry_run=True)


def test_layers_option_and_map_file(tmp_path) -> None:
    t, a = timm_vit(depth=4), timm_vit(depth=2, seed=9)
    tp, ap = save(tmp_path, "t.safetensors", t), save(tmp_path, "a.safetensors", a)
    plan = pair(tp, ap, dry_run=True, roles=["mlp_in", "mlp_out"]).plan
    assert {p.role for p in plan.pairs} == {"mlp_in", "mlp_out"} and len(plan.pairs) == 8
    mapping = {
        "blocks": {"0": 1, "3": None},
        "linears": {"blocks.1.attn.proj.weight": "blocks.0.mlp.fc2.weight", "blocks.2.mlp.fc1.weight": None},
    }
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    plan = pair(tp, ap, dry_run=True, map_file=tmp_path / "map.json").plan
    by_key = {p.target_key: p for p in plan.pairs}
    assert by_key["blocks.0.attn.qkv.weight"].aux_keys == ("blocks.1.attn.qkv.weight",)
    assert "blocks.3.attn.qkv.weight" in {s.target_key for s in plan.skips}
    assert {s.reason for s in plan.skips if s.target_key == "blocks.2.mlp.fc1.weight"} == {"skipped by --map"}
    bad = next(s for s in plan.skips if s.target_key == "blocks.1.attn.proj.weight")  # [D,H] cannot feed [D,D]
    assert "shape mismatch" in bad.reason
    assert plan.depth_policy == "map"


def test_cli_pair_table_json_and_refusals(cli, tmp_path, minilm_path) -> None:
    tp = save(tmp_path, "vit.safetensors", stack("blocks", 12, timm_block(384, 1536)) | vit_extras(384, 17))
    r = cli("pair", tp, minilm_path, "--dry-run")
    assert r.code == 0 and "48 of 48 linears paired, 0 skipped; depth 12 <- 6 (stretch)" in r.out
    assert "cat(q,k,v)" in r.out and "dry run" in r.out
    r = cli("pair", tp, minilm_path, "--json", "-o", tmp_path / "p.safetensors")
    data = json.loads(r.out)
    assert (data["paired"], data["skipped"]) == (48, 0) and data["output"].endswith("p.safetensors")
    r = cli("pair", tp, minilm_path, "-o", tmp_path / "p.safetensors")
    assert r.code == 2 and "--force" in r.err
    r = cli("pair", tp, minilm_path, "-o", tp, "--force")
    assert r.code == 2 and "overwrite an input" in r.err
    r = cli("pair", tp, minilm_path, "--depth", "index", "--dry-run")
    assert r.code == 2 and "equal depths" in r.err
    r = cli("pair", tp, minilm_path, "--layers", "nope", "--dry-run")
    assert r.code == 2 and "unknown layer role" in r.err


def test_paired_file_is_refused_as_a_target(tmp_path) -> None:
    tp, ap = save(tmp_path, "t.safetensors", timm_vit()), save(tmp_path, "a.safetensors", timm_vit(seed=1))
    p = pair(tp, ap).output
    with pytest.raises(Exception, match="already paired"):
        pair(p, ap, tmp_path / "again.safetensors")


def test_sharded_paired_output(tmp_path) -> None:
    tp, ap = save(tmp_path, "t.safetensors", timm_vit()), save(tmp_path, "a.safetensors", timm_vit(seed=1))
    res = pair(tp, ap, tmp_path / "out", shard_size="20KB")
    assert res.output.name == "model.safetensors.index.json"
    from mmsurgery.checkpoint import open_checkpoint

    with open_checkpoint(res.output) as ck:
        assert "blocks.2.mlp.fc2.aux_weight" in ck and len(ck.files) > 1


def test_real_hf_vit_model_paired_with_minilm_attaches_strictly(tmp_path, minilm_path) -> None:
    """A transformers ViTModel's own state dict (whatever names this transformers version uses) pairs with the
    real MiniLM, and the paired file attaches to and loads strictly into that same model, then folds exactly."""
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
    from mmsurgery import pathway

    cfg = transformers.ViTConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536, image_size=16, patch_size=4
    )
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg).eval()
    save_file(model.state_dict(), tmp_path / "hf.safetensors")
    res = pair(tmp_path / "hf.safetensors", minilm_path, tmp_path / "p.safetensors")
    assert len(res.plan.pairs) == 2 * 6 and not res.plan.skips  # q, k, v, out, fc1, fc2 per layer
    paired = load_file(res.output)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(pixel_values=x).last_hidden_state
    pathway.attach(model, paired)
    model.load_state_dict({**paired, **{k: v + 0.05 for k, v in paired.items() if k.endswith("cross_modal_scale")}})
    with torch.no_grad():
        unfolded = model(pixel_values=x).last_hidden_state
        folded = pathway.fold(model)(pixel_values=x).last_hidden_state
    assert (unfolded - before).abs().max() > 1e-3  # λ = 0.05 on MiniLM weights changes the output
    assert torch.allclose(unfolded, folded, atol=1e-5, rtol=0)  # float32, bit-exact weights: 1e-5 is generous


def test_aux_weight_takes_the_target_dtype_and_lambda_stays_float32(tmp_path) -> None:
    t = {k: v.to(torch.bfloat16) for k, v in timm_vit().items()}
    a = timm_vit(seed=1)  # float32
    out = load_file(pair(save(tmp_path, "t.safetensors", t), save(tmp_path, "a.safetensors", a)).output)
    assert out["blocks.0.attn.qkv.aux_weight"].dtype == torch.bfloat16
    assert torch.equal(out["blocks.0.attn.qkv.aux_weight"], a["blocks.0.attn.qkv.weight"].to(torch.bfloat16))
    assert out["blocks.0.attn.qkv.cross_modal_scale"].dtype == torch.float32


@pytest.mark.parametrize(
    ("op", "part", "conv1d", "dtype"),
    [
        ("copy", None, False, "float32"),
        ("cat_qkv", None, False, "float32"),
        ("chunk_qkv", 1, False, "float32"),
        ("chunk_qkv", 2, False, "bfloat16"),  # a cast: falls back to apply
        ("cat_qkv", None, True, "float32"),  # Conv1D transposes: falls back to apply
    ],
)
def test_transform_read_into_a_buffer_equals_apply(tmp_path, op, part, conv1d, dtype) -> None:
    """`pair` reads auxiliary tensors into one reused buffer (Transform.read, issue 13): the same values, shape and
    dtype as Transform.apply on freshly loaded tensors, for every op, and the buffer may hold stale bytes."""
    from mmsurgery.checkpoint import open_checkpoint
    from mmsurgery.pairing.transforms import Transform

    g = torch.Generator().manual_seed(0)
    keys = ["w"] if op != "cat_qkv" else ["q", "k", "v"]
    shape = (12, 5) if op == "chunk_qkv" else (4, 5)
    save_file({k: torch.randn(shape, generator=g) for k in keys}, tmp_path / "aux.safetensors")
    t = Transform(op, part, aux_conv1d=conv1d, target_conv1d=conv1d)
    buf = torch.full((4 * 12 * 5,), 0xAB, dtype=torch.uint8)
    with open_checkpoint(tmp_path / "aux.safetensors") as ck:
        want = t.apply([ck.get(k) for k in keys], dtype=getattr(torch, dtype))
        got = t.read(ck, keys, dtype, buf)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.is_contiguous() and not torch.equal(got, torch.zeros_like(got))
        direct = dtype == "float32" and not conv1d
        assert (got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()) == direct
