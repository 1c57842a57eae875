"""The weights stage: a fold is proven bit for bit against PAIRED, so no tampered weight passes the gate.

The tampering matrix runs `mmsurgery verify PLAIN --against PAIRED` through the CLI entry point (in process, for
speed; tests/test_verify.py runs the console script in a subprocess) on the built-in ViT and on a Hugging Face
ViT given with `--arch` (other key names). Every tamper must exit 1 with the weights stage failed and the tampered
tensor named; the correct fold must pass every stage that ran.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pathway_fixtures import trained_like
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

import mmsurgery.verify.weights as weights_module
from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.fold import fold_file
from mmsurgery.models.vit import VisionTransformer, ViTConfig
from mmsurgery.pairing import pair
from mmsurgery.verify.weights import check_weights, compare_bits

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def _trained(paired: Path, out: Path, seed: int, sign: float = 1.0) -> Path:
    """`paired` as training leaves it: λ ~ 0.2 + N(0, 0.3²) (times `sign`), every tensor moved a little."""
    return trained_like(paired, out, seed=seed, sign=sign)


def _negated(trained: Path, out: Path) -> Path:
    sd = {k: -v if k.endswith("cross_modal_scale") else v for k, v in load_file(trained).items()}
    save_file(sd, out, metadata=_metadata(trained))
    return out


def _builtin(d: Path) -> SimpleNamespace:
    torch.manual_seed(0)
    save_file(VisionTransformer(CFG).state_dict(), d / "target.safetensors")
    torch.manual_seed(1)
    save_file(VisionTransformer(CFG).state_dict(), d / "aux.safetensors")
    return SimpleNamespace(
        args=[],
        pathway="blocks.1.mlp.fc1.weight",
        norm="blocks.0.norm1.weight",
        bias="blocks.1.attn.proj.bias",
        heads=2,
    )


def _hf(d: Path) -> SimpleNamespace:
    pytest.importorskip("transformers", reason="transformers is an optional extra (in the dev extra)")
    import hf_vit_arch
    import transformers

    for seed, name in ((0, "target"), (1, "aux")):
        torch.manual_seed(seed)
        model = transformers.ViTForImageClassification(hf_vit_arch.config())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / f"{name}.safetensors")
    names = list(load_file(d / "target.safetensors"))
    fc1 = next(k for k in names if k.endswith("1.mlp.fc1.weight") or k.endswith("1.intermediate.dense.weight"))
    norm = next(k for k in names if "0.layernorm_before.weight" in k)
    bias = next(k for k in names if k.endswith("1.mlp.fc2.bias") or k.endswith("1.output.dense.bias"))
    return SimpleNamespace(args=["--arch", "hf_vit_arch:build"], pathway=fc1, norm=norm, bias=bias, heads=None)


ARCHS = {"builtin-vit": _builtin, "hf-vit": _hf}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp(request.param)
    a = ARCHS[request.param](d)
    paired = pair(d / "target.safetensors", d / "aux.safetensors", d / "p.safetensors", heads=a.heads).output
    a.dir = d
    a.trained = _trained(paired, d / "trained.safetensors", seed=2)
    a.plain = fold_file(a.trained, d / "plain.safetensors").output
    a.layers = [k.removesuffix(".cross_modal_scale") for k in load_file(a.trained) if k.endswith("cross_modal_scale")]
    assert f"{a.pathway.removesuffix('.weight')}" in a.layers, "the tampered pathway weight must be a folded one"
    # two ways to get a fold that is right for another paired file
    other = _trained(paired, d / "other.safetensors", seed=3)
    a.fold_of_other = fold_file(other, d / "plain-other.safetensors").output
    a.fold_negated = fold_file(_negated(a.trained, d / "negated.safetensors"), d / "plain-neg.safetensors").output
    return a


Tamper = Callable[[dict[str, Tensor], SimpleNamespace], dict[str, Tensor]]


def _element(key: str, fn: Callable[[Tensor], Tensor]) -> Callable[[SimpleNamespace], Tamper]:
    """A tamper of one element (index 1 of the flattened tensor) of the tensor `key` names on the arch."""

    def make(a: SimpleNamespace) -> Tamper:
        name = getattr(a, key)

        def tamper(sd: dict[str, Tensor], _a: SimpleNamespace) -> dict[str, Tensor]:
            t = sd[name].clone()
            flat = t.view(-1)
            flat[1] = fn(flat[1])
            assert not torch.equal(t, sd[name])
            return {**sd, name: t}

        return tamper

    return make


def _one_ulp(x: Tensor) -> Tensor:
    return torch.nextafter(x, torch.tensor(math.inf, dtype=x.dtype))


ELEMENT_EDITS: dict[str, Callable[[Tensor], Tensor]] = {
    "+1e-3": lambda x: x + 1e-3,
    "-1e-3": lambda x: x - 1e-3,
    "+1e-6": lambda x: x + 1e-6,
    "-1e-6": lambda x: x - 1e-6,
    "+1ulp": _one_ulp,
}


def _swap_rows(a: SimpleNamespace) -> Tamper:
    def tamper(sd: dict[str, Tensor], _a: SimpleNamespace) -> dict[str, Tensor]:
        t = sd[a.pathway].clone()
        t[[0, 1]] = t[[1, 0]]
        return {**sd, a.pathway: t}

    return tamper


def _through_float16(a: SimpleNamespace) -> Tamper:
    return lambda sd, _a: {**sd, a.norm: sd[a.norm].half().float()}


def _drop_key(a: SimpleNamespace) -> Tamper:
    return lambda sd, _a: {k: v for k, v in sd.items() if k != a.bias}


def _add_key(a: SimpleNamespace) -> Tamper:
    return lambda sd, _a: {**sd, "extra.weight": torch.ones(3)}


# name -> (the tamper, the tensor the weights stage must name: an attribute of the arch or a literal key)
MATRIX: dict[str, tuple[Callable[[SimpleNamespace], Tamper], str]] = {
    **{
        f"{where} {edit}": (_element(where, fn), where)
        for where in ("pathway", "norm", "bias")
        for edit, fn in ELEMENT_EDITS.items()
    },
    "rows swapped": (_swap_rows, "pathway"),
    "through float16": (_through_float16, "norm"),
    "key dropped": (_drop_key, "bias"),
    "key added": (_add_key, "=extra.weight"),
}


def _verify(cli, plain: Path, a: SimpleNamespace, report: Path, *extra: str):
    r = cli("verify", plain, "--against", a.trained, *a.args, "--json", report, *extra)
    return r, json.loads(report.read_text())


def test_correct_fold_passes_and_proves_every_tensor(arch, cli, tmp_path) -> None:
    r, data = _verify(cli, arch.plain, arch, tmp_path / "r.json")
    assert r.code == 0, r.out + r.err
    stages = {s["name"]: s for s in data["stages"]}
    assert next(iter(stages)) == "weights"
    w = stages["weights"]
    n = len(load_file(arch.plain))
    assert w["status"] == "pass" and w["numbers"]["identical_tensors"] == n == w["numbers"]["compared_tensors"]
    assert w["numbers"]["identical_bytes"] == sum(v.numel() * v.element_size() for v in load_file(arch.plain).values())
    assert f"{n} tensors" in w["message"] and "bit-identical" in w["message"]
    assert w["numbers"]["pathways"] == len(arch.layers) > 0
    assert stages["fold"]["status"] == "pass" and stages["fold"]["numbers"]["pathway_effect_max_abs"] > 1e-3


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_tamper_fails_the_weights_stage_naming_the_tensor(arch, cli, tmp_path, case) -> None:
    make, named = MATRIX[case]
    sd = load_file(arch.plain)
    tampered = make(arch)(sd, arch)
    path = tmp_path / "tampered.safetensors"
    save_file(tampered, path, metadata=_metadata(arch.plain))
    r, data = _verify(cli, path, arch, tmp_path / "r.json", "--stages", "weights")  # the stage under test
    assert r.code == 1, r.out + r.err
    assert "FAILED (weights" in r.out
    w = next(s for s in data["stages"] if s["name"] == "weights")
    name = named[1:] if named.startswith("=") else getattr(arch, named)
    assert w["status"] == "fail" and name in w["message"], w["message"]
    if case.startswith(("pathway", "norm", "bias")):
        diff = w["numbers"]["differing"][0]
        assert diff["name"] == name and diff["over"] == 1 and diff["worst_flat"] == 1
        assert diff["actual"] == tampered[name].view(-1)[1].item() and diff["expected"] == sd[name].view(-1)[1].item()
        if case.endswith("1ulp"):
            assert diff["ulps"] == 1 and "(1 ulp)" in w["message"]


@pytest.mark.parametrize("which", ["fold_of_other", "fold_negated"])
def test_a_fold_of_another_paired_file_fails(arch, cli, tmp_path, which) -> None:
    r, data = _verify(cli, getattr(arch, which), arch, tmp_path / "r.json")
    assert r.code == 1, r.out
    w = next(s for s in data["stages"] if s["name"] == "weights")
    assert w["status"] == "fail"
    assert w["numbers"]["differing_tensors"] >= len(arch.layers)  # every folded weight differs
    assert any(f"{layer}.weight: " in w["message"] for layer in arch.layers), w["message"]


def test_a_recorded_source_digest_must_be_pairs(arch, cli, tmp_path) -> None:
    """`fold --source-hash` writes PAIRED's sha256 into PLAIN; verify checks it. Against a PAIRED with the very same
    tensors but other bytes (one metadata entry added), every tensor is identical and the stage still fails: PLAIN
    claims another origin. A PLAIN without the digest is not asked about it."""
    import hashlib

    hashed = fold_file(arch.trained, tmp_path / "hashed.safetensors", source_hash=True).output
    digest = hashlib.sha256(arch.trained.read_bytes()).hexdigest()
    assert _metadata(hashed)["mmsurgery.source_sha256"] == digest
    r, data = _verify(cli, hashed, arch, tmp_path / "ok.json")
    w = next(s for s in data["stages"] if s["name"] == "weights")
    assert r.code == 0 and w["numbers"]["source_sha256"] == {"recorded": digest, "paired": digest}
    assert "source sha256 is PAIRED's" in w["message"]

    other = tmp_path / "resaved.safetensors"
    save_file(load_file(arch.trained), other, metadata={**_metadata(arch.trained), "note": "re-saved"})
    r = cli("verify", hashed, "--against", other, *arch.args, "--json", tmp_path / "bad.json")
    data = json.loads((tmp_path / "bad.json").read_text())
    w = next(s for s in data["stages"] if s["name"] == "weights")
    assert r.code == 1 and w["status"] == "fail", w["message"]
    assert w["numbers"]["differing_tensors"] == 0  # the tensors are all right: only the provenance is wrong
    assert "folded from another file" in w["message"] and digest[:16] in w["message"]

    r, data = _verify(cli, arch.plain, arch, tmp_path / "none.json")
    w = next(s for s in data["stages"] if s["name"] == "weights")
    assert r.code == 0 and w["numbers"]["source_sha256"] is None


def test_weights_ulps_allows_exactly_n_units_in_the_last_place(arch, cli, tmp_path) -> None:
    sd = load_file(arch.plain)
    t = sd[arch.pathway].clone()
    t.view(-1)[1] = _one_ulp(_one_ulp(t.view(-1)[1]))  # two ulps away
    path = tmp_path / "two-ulps.safetensors"
    save_file({**sd, arch.pathway: t}, path, metadata=_metadata(arch.plain))
    for ulps, code in ((0, 1), (1, 1), (2, 0)):
        r, data = _verify(cli, path, arch, tmp_path / f"r{ulps}.json", "--weights-ulps", str(ulps))
        w = next(s for s in data["stages"] if s["name"] == "weights")
        assert r.code == code, (ulps, w["message"])
        assert w["numbers"]["max_ulps"] == ulps and data["inputs"]["weights_ulps"] == ulps
    assert "within 2 ulps" in w["message"]


def test_weights_stage_alone_from_python(arch) -> None:
    """The stage needs no model: two open checkpoints in, a typed result out."""
    with open_checkpoint(arch.plain) as plain, open_checkpoint(arch.trained) as paired:
        result = check_weights(plain, paired)
    assert result.name == "weights" and result.status == "pass"
    assert result.numbers["identical_tensors"] == result.numbers["expected_tensors"] > 0
    with open_checkpoint(arch.fold_negated) as plain, open_checkpoint(arch.trained) as paired:
        wrong = check_weights(plain, paired)
    assert wrong.status == "fail" and wrong.numbers["differing_tensors"] == len(arch.layers)


def test_bfloat16_fold_is_proven_against_fold_dtype_bfloat16(tmp_path) -> None:
    d = tmp_path
    a = _builtin(d)
    paired = pair(d / "target.safetensors", d / "aux.safetensors", d / "p.safetensors", heads=a.heads).output
    trained = _trained(paired, d / "trained.safetensors", seed=2)
    plain = fold_file(trained, d / "bf16.safetensors", dtype="bfloat16").output
    with open_checkpoint(plain) as p, open_checkpoint(trained) as t:
        ok = check_weights(p, t)
    assert ok.status == "pass" and ok.numbers["fold_dtype"] == "bfloat16", ok.message
    # one tensor kept in float32 while the rest is bfloat16: no single `fold --dtype` makes that
    sd = load_file(plain)
    sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"].float()
    save_file(sd, d / "mixed.safetensors")
    with open_checkpoint(d / "mixed.safetensors") as p, open_checkpoint(trained) as t:
        bad = check_weights(p, t)
    assert bad.status == "fail" and "dtype mismatch" in bad.message and "blocks.0.norm1.weight" in bad.message


# compare_bits: the ulp arithmetic, exactly


def _f32(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_identical_bits_are_none_and_one_ulp_is_one() -> None:
    x = _f32(1.0, -2.5, 0.0)
    assert compare_bits("x", x, x.clone()) is None
    y = x.clone()
    y[1] = torch.nextafter(y[1], torch.tensor(0.0))
    d = compare_bits("x", y, x)
    assert d is not None and d.ulps == 1 and d.over == 1 and d.worst_index == (1,)
    assert compare_bits("x", y, x, max_ulps=1) is None


def test_ulps_across_zero_and_signed_zero() -> None:
    tiny = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)).item()  # the smallest positive subnormal
    d = compare_bits("x", _f32(tiny), _f32(-tiny))
    assert d is not None and d.ulps == 2  # -tiny → -0/+0 → +tiny
    z = compare_bits("x", _f32(-0.0), _f32(0.0))
    assert z is not None and z.ulps == 1  # other bits: never identical, one ulp apart
    assert compare_bits("x", _f32(-0.0), _f32(0.0), max_ulps=1) is None


def test_nan_and_integer_differences_are_never_within_ulps() -> None:
    d = compare_bits("x", _f32(float("nan")), _f32(1.0), max_ulps=10**9)
    assert d is not None and d.ulps is None and "not comparable in ulps" in d.describe()
    i = compare_bits("ids", torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2]), max_ulps=10**9)
    assert i is not None and i.ulps is None and i.worst_index == (2,)
    nan = _f32(float("nan"))
    assert compare_bits("x", nan, nan.clone()) is None  # the same NaN bits are identical


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_ulps_in_other_float_dtypes(dtype) -> None:
    x = torch.tensor([1.0, -3.0, 0.5], dtype=dtype)
    y = x.clone()
    for _ in range(3):
        y[1] = torch.nextafter(y[1], torch.tensor(-math.inf, dtype=dtype))
    d = compare_bits("x", y, x)
    assert d is not None and d.ulps == 3 and d.worst_index == (1,)


def test_huge_distances_saturate_without_overflow() -> None:
    big = torch.finfo(torch.float64).max
    d = compare_bits("x", torch.tensor([big], dtype=torch.float64), torch.tensor([-big], dtype=torch.float64))
    assert d is not None and d.ulps is not None and d.ulps >= 2**62


def test_chunked_counts_match(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    y = x.clone()
    y[[3, 400, 999]] += torch.tensor([1e-3, 1e-6, 1e-4])
    whole = compare_bits("x", y, x)
    monkeypatch.setattr(weights_module, "_CHUNK", 64)
    chunked = compare_bits("x", y, x)
    assert whole == chunked and whole is not None
    assert whole.over == 3 and whole.worst_index == (3,)
