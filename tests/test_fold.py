"""`mmsurgery fold`: streaming, bit-identical to the in-memory fold, safe on bad input, atomic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery import pathway
from mmsurgery.checkpoint import Checkpoint, open_checkpoint, write_safetensors
from mmsurgery.checkpoint.writer import SafetensorsWriter
from mmsurgery.errors import BadInputError, FoldError
from mmsurgery.fold import fold_file, plain_tensors
from mmsurgery.models.vit import VisionTransformer, ViTConfig, vit_from_checkpoint
from mmsurgery.paired_format import open_paired, paired_view
from mmsurgery.pairing import pair

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)


@pytest.fixture
def trained(tmp_path):
    """A paired checkpoint as training leaves it: non-zero λ, W_aux moved away from the aux model."""
    torch.manual_seed(0)
    save_file(VisionTransformer(CFG).state_dict(), tmp_path / "target.safetensors")
    torch.manual_seed(1)
    save_file(VisionTransformer(CFG).state_dict(), tmp_path / "aux.safetensors")
    paired = pair(tmp_path / "target.safetensors", tmp_path / "aux.safetensors", tmp_path / "p.safetensors").output
    sd = load_file(paired)
    with safe_open(paired, "pt") as f:
        meta = f.metadata()
    g = torch.Generator().manual_seed(2)
    for k in sd:
        if k.endswith("cross_modal_scale"):
            sd[k] = torch.randn(1, generator=g) * 0.3
        elif k.endswith("aux_weight"):
            sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, tmp_path / "trained.safetensors", metadata=meta)
    return tmp_path / "trained.safetensors"


def in_memory_fold(paired_path):
    sd = load_file(paired_path)
    plain, _ = pathway.split_paired(sd)
    model = vit_from_checkpoint(plain, num_heads=2)
    pathway.attach(model, sd)
    model.load_state_dict(sd, strict=True)
    return pathway.fold(model).state_dict()


def test_fold_is_bit_identical_to_in_memory_fold_and_loads_strictly(trained, tmp_path) -> None:
    res = fold_file(trained)
    assert res.output == tmp_path / "trained.plain.safetensors" and len(res.scales) == 12
    folded = load_file(res.output)
    target = load_file(tmp_path / "target.safetensors")
    assert list(folded) == list(target)  # same keys, same order: no λ, no W_aux
    assert all(folded[k].shape == v.shape and folded[k].dtype == v.dtype for k, v in target.items())
    expected = in_memory_fold(trained)
    assert all(torch.equal(folded[k], expected[k]) for k in expected)  # bit-identical, not just close
    assert not torch.equal(folded["blocks.0.attn.qkv.weight"], target["blocks.0.attn.qkv.weight"])
    assert torch.equal(folded["blocks.0.attn.qkv.bias"], target["blocks.0.attn.qkv.bias"])  # aux bias unused
    VisionTransformer(CFG).load_state_dict(folded, strict=True)


def test_folded_model_reproduces_the_unfolded_output(trained) -> None:
    sd = load_file(trained)
    plain, _ = pathway.split_paired(sd)
    unfolded = pathway.attach(vit_from_checkpoint(plain, num_heads=2), sd)
    unfolded.load_state_dict(sd, strict=True)
    folded = vit_from_checkpoint(load_file(fold_file(trained).output), num_heads=2)
    untouched = vit_from_checkpoint(plain, num_heads=2)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b, c = unfolded.eval()(x), folded.eval()(x), untouched.eval()(x)
    # float32, same weights bit for bit: the only difference could be kernel scheduling, so 1e-6 is generous.
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert (a - c).abs().max() > 1e-3  # the pathway changed the model, so the match is not trivial


def test_metadata_records_scales_and_source_hash(trained) -> None:
    res = fold_file(trained, source_hash=True)
    with safe_open(res.output, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mmsurgery.scales"]) == pytest.approx(res.scales)
    assert meta["mmsurgery.source_sha256"] == res.sha256 == hashlib.sha256(trained.read_bytes()).hexdigest()
    assert meta["mmsurgery.format"] == "folded/1" and "mmsurgery.vit" in meta


def test_source_hash_is_opt_in_and_changes_no_tensor(trained, tmp_path) -> None:
    """The console script by default records no digest; `--source-hash` records PAIRED's sha256 and nothing else
    changes: the same tensor bytes, the same other metadata."""
    runs = {}
    for flag in ([], ["--source-hash"]):
        out = tmp_path / f"plain{len(flag)}.safetensors"
        r = subprocess.run(
            [sys.executable, "-m", "mmsurgery", "fold", str(trained), "-o", str(out), "--json", *flag],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        with safe_open(out, "pt") as f:
            runs[bool(flag)] = (load_file(out), f.metadata(), json.loads(r.stdout))
    (hashed, meta, report), (default, meta_d, report_d) = runs[True], runs[False]
    assert hashed.keys() == default.keys() and all(torch.equal(hashed[k], default[k]) for k in hashed)
    assert meta["mmsurgery.source_sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    assert "mmsurgery.source_sha256" not in meta_d and report_d["source_sha256"] is None
    assert report["source_sha256"] == meta["mmsurgery.source_sha256"]
    assert {k: v for k, v in meta.items() if k != "mmsurgery.source_sha256"} == meta_d


def test_accepts_ddp_pt_with_wrapper_and_sharded(trained, tmp_path) -> None:
    sd = load_file(trained)
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 9}, tmp_path / "ckpt.pt")
    a = load_file(fold_file(tmp_path / "ckpt.pt", tmp_path / "from_pt.safetensors").output)
    idx = write_safetensors(tmp_path / "sharded", sd, shard_size="40KB").path  # a sharded paired input
    assert idx.name == "model.safetensors.index.json"
    b_res = fold_file(idx, tmp_path / "out", shard_size="40KB")
    with open_checkpoint(b_res.output) as ck:
        b = ck.to_state_dict()
    expected = in_memory_fold(trained)
    for got in (a, b):
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_nan_scale_or_weight_is_refused_naming_the_layer(trained, tmp_path, cli) -> None:
    sd = load_file(trained)
    sd["blocks.1.mlp.fc1.cross_modal_scale"] = torch.tensor([float("nan")])
    save_file(sd, tmp_path / "nan.safetensors")
    r = cli("fold", tmp_path / "nan.safetensors")
    assert r.code == 2 and "blocks.1.mlp.fc1" in r.err and "cross_modal_scale" in r.err
    sd = load_file(trained)
    sd["blocks.2.attn.proj.aux_weight"][0, 0] = float("inf")
    save_file(sd, tmp_path / "inf.safetensors")
    r = cli("fold", tmp_path / "inf.safetensors")
    assert r.code == 2 and "blocks.2.attn.proj" in r.err and "not finite" in r.err
    assert sorted(p.name for p in tmp_path.iterdir() if "plain" in p.name or p.name.startswith(".")) == []


def test_already_plain_writes_nothing(trained, tmp_path, cli) -> None:
    r = cli("fold", tmp_path / "target.safetensors")
    assert r.code == 0 and "already plain" in r.out
    assert not (tmp_path / "target.plain.safetensors").exists()
    data = json.loads(cli("fold", tmp_path / "target.safetensors", "--json").out)
    assert data["already_plain"] is True and data["output"] is None


def test_failed_write_leaves_no_partial_output(trained, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    real = SafetensorsWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", failing)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="No space"):
        fold_file(trained, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file


def test_dtype_option_and_cli_json(trained, tmp_path, cli) -> None:
    r = cli("fold", trained, "-o", tmp_path / "bf16.safetensors", "--dtype", "bfloat16", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["folded"] == 12 and data["num_tensors"] == len(load_file(tmp_path / "target.safetensors"))
    out = load_file(tmp_path / "bf16.safetensors")
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    expected = in_memory_fold(trained)["blocks.0.mlp.fc2.weight"].to(torch.bfloat16)
    assert torch.equal(out["blocks.0.mlp.fc2.weight"], expected)
    assert cli("fold", trained, "-o", tmp_path / "bf16.safetensors").code == 2  # exists, no --force
    assert cli("fold", trained, "--dtype", "int8").code == 2


def test_inspect_shows_scales_and_plots(trained, tmp_path, cli) -> None:
    data = json.loads(cli("inspect", trained, "--json").out)
    layers = data["pathway"]["layers"]
    sd = load_file(trained)
    assert len(layers) == 12
    assert layers[0]["scale"] == pytest.approx(float(sd[layers[0]["layer"] + ".cross_modal_scale"]))
    r = cli("inspect", trained, "--plot", tmp_path / "lam.png")
    assert r.code == 0 and "λ per layer" in r.out and "█" in r.out
    assert (tmp_path / "lam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(cli("inspect", tmp_path / "target.safetensors", "--json").out)["pathway"] is None


def test_open_paired_gives_pathways_scales_and_plain_keys(trained, tmp_path) -> None:
    sd = load_file(trained)
    target = list(load_file(tmp_path / "target.safetensors"))
    with open_paired(trained) as paired:
        assert not paired.is_plain and paired.num_aux == 1 and paired.format == "paired/1"
        assert paired.path == trained and paired.metadata["mmsurgery.format"] == "paired/1"
        layers = [k.removesuffix(".aux_weight") for k in sd if k.endswith(".aux_weight")]
        assert list(paired.pathways) == layers and len(layers) == 12
        assert paired.scales == {p: pytest.approx(float(sd[f"{p}.cross_modal_scale"])) for p in layers}
        assert paired.plain_keys == target  # file order, every target tensor, no λ or W_aux
        assert set(paired.pathway_keys) == set(sd) - set(target)
        assert paired.nonfinite_layers == []
        assert json.loads(paired.plan_json(0))["paired"] == 12 and paired.plan_json(1) is None
        source = plain_tensors(paired)  # the fold takes the opened file as it is
        assert source.layers == layers and [s.name for s in source.specs] == target
        assert [s.name for s in plain_tensors(paired.ck).specs] == target  # and a plain Checkpoint still
    with pytest.raises(ValueError, match="read after the checkpoint was closed"):
        paired.ck.get(target[0])  # leaving the block closed the checkpoint
    with open_paired(tmp_path / "target.safetensors") as plain:
        assert plain.is_plain and plain.num_aux == 0 and plain.scales == {} and plain.format is None
        assert plain.plain_keys == target and plain.pathway_keys == [] and plain.plan_json() is None


def test_open_paired_refuses_a_newer_version_and_a_broken_file_in_one_line(trained, tmp_path, monkeypatch) -> None:
    closed = []
    real_close = Checkpoint.close
    monkeypatch.setattr(Checkpoint, "close", lambda self: closed.append(self.path) or real_close(self))
    sd = load_file(trained)
    with safe_open(trained, "pt") as f:
        meta = f.metadata()
    save_file(sd, tmp_path / "future.safetensors", metadata={**meta, "mmsurgery.format": "paired/9"})
    with pytest.raises(BadInputError, match=r"paired/9.*upgrade mmsurgery") as e:
        open_paired(tmp_path / "future.safetensors")
    assert "\n" not in str(e.value)
    del sd["blocks.1.mlp.fc1.cross_modal_scale"]
    save_file(sd, tmp_path / "half.safetensors", metadata=meta)
    with pytest.raises(FoldError, match=r"blocks\.1\.mlp\.fc1: aux_weight without cross_modal_scale") as e:
        open_paired(tmp_path / "half.safetensors")
    assert "\n" not in str(e.value)
    assert closed == [tmp_path / "future.safetensors", tmp_path / "half.safetensors"]  # a refused file is closed
    with open_checkpoint(tmp_path / "half.safetensors") as ck, pytest.raises(FoldError, match="not a consistent"):
        paired_view(ck)  # the same checks over a checkpoint the caller opened
