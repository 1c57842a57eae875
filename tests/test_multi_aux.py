"""Issue 14: several auxiliary models (`W + Σₖ λₖ·W_auxₖ`) and finer λ (per qkv chunk, per output channel),
through pair, attach, param_groups, fold (file and memory), inspect and verify.

Exactness: every fold here is compared bit for bit (`torch.equal`) with the in-memory fold and with the weight the
float32 training forward uses — the same elementwise roundings in the same order — and every comparison also
asserts that the folded weight differs from the untouched one, so none can pass trivially.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery import pathway
from mmsurgery.errors import AttachError, BadInputError, FoldError
from mmsurgery.foldmath import effective_weight, fold_weight
from mmsurgery.paired_format import (
    FORMAT_KEY,
    block_view,
    check_format,
    find_pathways,
    open_paired,
    parse_key,
    plan_key,
    scale_entry,
    scale_problem,
    scale_shape,
)
from tests.pathway_fixtures import batch, state_equal, tiny_vit, train_steps

MMSURGERY = [sys.executable, "-m", "mmsurgery"]


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MMSURGERY, *map(str, args)], capture_output=True, text=True, timeout=120)


def save_vit(path: Path, seed: int) -> Path:
    save_file(tiny_vit(seed).state_dict(), str(path))
    return path


def randomize_scales(model: torch.nn.Module, seed: int = 3) -> None:
    """λ away from 0, different per auxiliary and per element, so folds are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pw in pathway.pathway_modules(model).values():
            for s in pw.scales:
                s.copy_(torch.randn(s.shape, generator=gen) * 0.5)


# ---- the contract --------------------------------------------------------------------------------------------


def test_key_names_first_auxiliary_keeps_m2pt_names() -> None:
    assert parse_key("blocks.0.attn.qkv.aux_weight") == parse_key("blocks.0.attn.qkv.aux_weight")
    k0 = parse_key("blocks.0.attn.qkv.cross_modal_scale")
    k2 = parse_key("blocks.0.attn.qkv.aux_weight_2")
    assert (k0.module, k0.kind, k0.index) == ("blocks.0.attn.qkv", "scale", 0)
    assert (k2.module, k2.kind, k2.index) == ("blocks.0.attn.qkv", "aux", 2)
    for not_pathway in ("blocks.0.attn.qkv.weight", "x.aux_weight_0", "x.aux_weight_01", "x.aux_weights"):
        assert parse_key(not_pathway) is None, not_pathway
    assert plan_key(0) == "mmsurgery.plan" and plan_key(1) == "mmsurgery.plan.1"


def test_scale_shapes_and_the_block_rule() -> None:
    assert scale_shape("per-linear", (96, 32), fused_qkv=True, conv1d=False) == (1,)
    assert scale_shape("per-qkv", (96, 32), fused_qkv=True, conv1d=False) == (3, 1)
    assert scale_shape("per-qkv", (32, 32), fused_qkv=False, conv1d=False) == (1,)  # split q/k/v: one each
    assert scale_shape("per-channel", (96, 32), fused_qkv=True, conv1d=False) == (96, 1)
    assert scale_shape("per-channel", (32, 96), fused_qkv=True, conv1d=True) == (1, 96)  # Conv1D is [in, out]
    assert scale_shape("per-qkv", (32, 96), fused_qkv=True, conv1d=True) == (1, 3)
    for ok in ((1,), (), (3, 1), (96, 1), (1, 32), (96, 32), (1, 1)):
        assert scale_problem(ok, (96, 32)) is None, ok
    for bad in ((2,), (5, 1), (1, 1, 1), (0, 1)):
        assert scale_problem(bad, (96, 32)) is not None, bad
    assert block_view((96, 32), (3, 1)) == ((3, 32, 32), (3, 1, 1))
    with pytest.raises(BadInputError, match="choose one of"):
        scale_shape("per-head", (96, 32), fused_qkv=True, conv1d=False)


def test_find_pathways_reports_gaps_and_half_pathways() -> None:
    w = (8, 4)
    good = {"a.weight": w, "a.aux_weight": w, "a.cross_modal_scale": (1,), "a.aux_weight_1": w}
    good["a.cross_modal_scale_1"] = (8, 1)
    specs = find_pathways(good)
    assert specs["a"].scale_shapes == ((1,), (8, 1)) and specs["a"].num_aux == 2
    gap = {"a.weight": w, "a.aux_weight_2": w, "a.cross_modal_scale_2": (1,)}
    with pytest.raises(FoldError, match="no gap"):
        find_pathways(gap)
    half = {"a.weight": w, "a.aux_weight": w, "a.cross_modal_scale": (1,), "a.aux_weight_1": w}
    with pytest.raises(FoldError, match="aux_weight_1 without cross_modal_scale_1"):
        find_pathways(half)


def test_a_newer_format_version_is_refused_with_one_line(tmp_path) -> None:
    check_format({FORMAT_KEY: "paired/2"}, "f")  # this version reads it
    with pytest.raises(BadInputError, match=r"newer mmsurgery.*upgrade"):
        check_format({FORMAT_KEY: "paired/3"}, "f")
    model = tiny_vit(0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "blocks.0.attn.qkv"
    state |= {
        f"{name}.aux_weight": torch.zeros_like(state[f"{name}.weight"]),
        f"{name}.cross_modal_scale": torch.ones(1),
    }
    path = tmp_path / "future.safetensors"
    save_file(state, str(path), metadata={FORMAT_KEY: "paired/9", "mmsurgery.version": "9.0"})
    for cmd in (["fold", path, "-o", tmp_path / "out.safetensors"], ["inspect", path]):
        r = run(*cmd)
        assert r.returncode == 2, r.stderr
        assert "paired/9" in r.stderr and "upgrade" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_scale_entry_keeps_the_classic_float() -> None:
    assert scale_entry([[0.5]]) == 0.5
    assert scale_entry([[0.5], [0.25]]) == [0.5, 0.25]
    assert scale_entry([[1.0, 2.0, 3.0]]) == [[1.0, 2.0, 3.0]]


# ---- the arithmetic ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_shapes", [[(1,), (1,)], [(3, 1), (96, 1)], [(1, 32), (1,), (3, 1)]])
def test_training_forward_equals_fold_bit_for_bit(scale_shapes) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 32, generator=gen)
    auxes = [torch.randn(96, 32, generator=gen) for _ in scale_shapes]
    scales = [torch.randn(s, generator=gen) for s in scale_shapes]
    merged = effective_weight(w, scales, auxes)
    folded = fold_weight(w, scales, auxes)
    assert torch.equal(merged, folded) and not torch.equal(folded, w)
    expected = w.clone()  # the definition, left to right, each λ expanded to W's shape
    for s, a in zip(scales, auxes, strict=True):
        full = s.reshape(-1)[0] if s.numel() == 1 else s
        for d, n in enumerate(full.shape):
            full = full.repeat_interleave(w.shape[d] // n, dim=d) if n not in (1, w.shape[d]) else full
        expected = expected + full * a
    assert torch.equal(folded, expected)


def test_fold_into_a_reused_buffer_is_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(1)
    w, a0, a1 = (torch.randn(96, 32, generator=gen) for _ in range(3))
    scales = [torch.randn(3, 1, generator=gen), torch.randn(96, 1, generator=gen)]
    fresh = fold_weight(w, scales, [a0, a1])
    buffer = a0.clone()
    in_place = fold_weight(w, scales, [buffer, a1], out=buffer)
    assert in_place.data_ptr() == buffer.data_ptr() and torch.equal(in_place, fresh)


# ---- pair, attach, fold, verify end to end ---------------------------------------------------------------------


@pytest.fixture
def two_aux(tmp_path) -> Path:
    """A tiny ViT paired with two other ViTs through the console script: k = 2."""
    target, a1, a2 = save_vit(tmp_path / "t.safetensors", 0), save_vit(tmp_path / "a1.safetensors", 1), None
    a2 = save_vit(tmp_path / "a2.safetensors", 2)
    out = tmp_path / "two.safetensors"
    r = run("pair", target, a1, a2, "-o", out, "--depth", "first", "--depth", "stretch", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [p["aux"]["path"] for p in data["plans"]] == [str(a1), str(a2)]
    assert [p["depth_policy"] for p in data["plans"]] == ["first", "stretch"]
    return out


def test_pair_two_auxiliaries_writes_one_pathway_per_auxiliary(two_aux) -> None:
    with safe_open(str(two_aux), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    for name in tiny_vit(0).block_linear_names():
        assert {f"{name}.aux_weight", f"{name}.cross_modal_scale"} <= keys
        assert {f"{name}.aux_weight_1", f"{name}.cross_modal_scale_1"} <= keys
        assert f"{name}.aux_weight_2" not in keys
    assert meta[FORMAT_KEY] == "paired/2" and plan_key(1) in meta
    state = load_file(str(two_aux))
    a1, a2 = tiny_vit(1).state_dict(), tiny_vit(2).state_dict()
    assert torch.equal(state["blocks.1.mlp.fc1.aux_weight"], a1["blocks.1.mlp.fc1.weight"])
    assert torch.equal(state["blocks.1.mlp.fc1.aux_weight_1"], a2["blocks.1.mlp.fc1.weight"])


def test_one_auxiliary_files_stay_paired_1_with_m2pt_names(tmp_path) -> None:
    target, aux = save_vit(tmp_path / "t.safetensors", 0), save_vit(tmp_path / "a.safetensors", 1)
    r = run("pair", target, aux, "-o", tmp_path / "one.safetensors")
    assert r.returncode == 0, r.stderr
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:
        assert f.metadata()[FORMAT_KEY] == "paired/1"
        assert not [k for k in f.keys() if k.endswith("_1")]  # noqa: SIM118 (a safe_open handle)
        assert "scale_mode" not in f.metadata()["mmsurgery.plan"] and "aux_index" not in f.metadata()["mmsurgery.plan"]


def test_attach_train_and_fold_k2_file_is_bit_identical_to_memory(two_aux, tmp_path) -> None:
    model = tiny_vit(0)
    pathway.attach(model, two_aux, aux_trainable=[True, False])
    pw = pathway.pathway_modules(model)["blocks.0.attn.qkv"]
    assert pw.num_aux == 2 and pw.aux_weight.requires_grad and not pw.aux_weight_1.requires_grad
    groups = {g["name"]: g for g in pathway.param_groups(model, 0.05, lr=1e-3, scale_lr_mult=[10.0, 100.0])}
    assert groups["cross_modal_scale"]["lr"] == pytest.approx(1e-2)
    assert groups["cross_modal_scale_1"]["lr"] == pytest.approx(1e-1)
    x, y = batch()
    train_steps(model, x, y, steps=2)
    randomize_scales(model)
    state = model.state_dict()
    assert "blocks.0.attn.qkv.aux_weight_1" in state and "blocks.0.attn.qkv.cross_modal_scale_1" in state
    trained = tmp_path / "trained.safetensors"
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(trained))
    with torch.no_grad():
        unfolded_out = model(x)
    lam = pathway.scales(model)["blocks.0.attn.qkv"]
    assert isinstance(lam, list) and len(lam) == 2
    r = run("fold", trained, "-o", tmp_path / "plain.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["scales"]["blocks.0.attn.qkv"] == pytest.approx(lam)
    folded_file = load_file(str(tmp_path / "plain.safetensors"))
    pathway.fold(model)
    memory = model.state_dict()
    assert folded_file.keys() == memory.keys()
    for k in memory:
        assert torch.equal(folded_file[k], memory[k]), k
    untouched = tiny_vit(0).state_dict()
    assert not torch.equal(memory["blocks.0.attn.qkv.weight"], untouched["blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        assert torch.equal(model(x), unfolded_out)  # float32: the folded forward is the training forward


def test_attach_from_an_opened_k2_file_equals_attach_from_its_state_dict(two_aux) -> None:
    with open_paired(two_aux) as paired:
        assert paired.num_aux == 2 and paired.format == "paired/2"
        assert {spec.num_aux for spec in paired.pathways.values()} == {2}
        assert paired.scales["blocks.0.attn.qkv"] == [0.0, 0.0]
        assert json.loads(paired.plan_json(1))["aux_index"] == 1 and paired.plan_json(2) is None
        from_file = pathway.attach(tiny_vit(0), paired, init_scale=[0.25, -0.5], aux_trainable=[True, False])
    from_dict = pathway.attach(
        tiny_vit(0), load_file(str(two_aux)), init_scale=[0.25, -0.5], aux_trainable=[True, False]
    )
    assert state_equal(from_file.state_dict(), from_dict.state_dict())
    pw = pathway.pathway_modules(from_file)["blocks.0.attn.qkv"]
    assert pw.aux_weight.requires_grad and not pw.aux_weight_1.requires_grad
    x, _ = batch()
    with torch.no_grad():
        out = from_file(x)
        assert torch.equal(out, from_dict(x)) and not torch.equal(out, tiny_vit(0)(x))


def test_attach_refuses_a_file_whose_layers_disagree_on_the_number_of_auxiliaries(two_aux) -> None:
    state = load_file(str(two_aux))
    del state["blocks.1.mlp.fc2.aux_weight_1"], state["blocks.1.mlp.fc2.cross_modal_scale_1"]
    model = tiny_vit(0)
    with pytest.raises(AttachError, match="other layers have 2"):
        pathway.attach(model, state)
    assert not pathway.is_attached(model)


@pytest.mark.parametrize(("option", "value"), [("aux_trainable", [True]), ("init_scale", [0.0, 0.0, 0.0])])
def test_attach_refuses_a_per_auxiliary_option_of_the_wrong_length(two_aux, option, value) -> None:
    """One value serves every auxiliary; a list must have one per auxiliary (2 here), else nothing is attached."""
    model = tiny_vit(0)
    with pytest.raises(AttachError, match=rf"{option}: {len(value)} value\(s\) for 2 auxiliary model\(s\)"):
        pathway.attach(model, str(two_aux), **{option: value})
    assert not pathway.is_attached(model)
    pathway.attach(model, str(two_aux), **{option: value[0]})  # the same value once: for both
    assert pathway.is_attached(model)


def test_verify_gates_a_k2_fold_and_catches_a_tampered_one(two_aux, tmp_path) -> None:
    model = tiny_vit(0)
    pathway.attach(model, two_aux)
    randomize_scales(model)
    trained = tmp_path / "trained.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(trained))
    plain = tmp_path / "plain.safetensors"
    assert run("fold", trained, "-o", plain).returncode == 0
    ok = run("verify", plain, "--against", trained, "--json", tmp_path / "ok.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    stages = {s["name"]: s for s in json.loads((tmp_path / "ok.json").read_text())["stages"]}
    assert stages["weights"]["status"] == "pass" and stages["weights"]["numbers"]["pathways"] == 8
    assert stages["fold"]["status"] == "pass" and stages["fold"]["numbers"]["pathway_effect_max_abs"] > 1e-3
    state = load_file(str(plain))
    state["blocks.1.mlp.fc1.weight"][3, 4] += 1e-3  # a wrong weight must never pass
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    r = run("verify", bad, "--against", trained)
    assert r.returncode == 1 and "blocks.1.mlp.fc1.weight" in r.stdout


def test_inspect_charts_one_column_group_per_auxiliary(two_aux) -> None:
    r = run("inspect", two_aux, "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["pathway"]["layers"]
    assert all(isinstance(entry["scale"], list) and len(entry["scale"]) == 2 for entry in layers)
    text = subprocess.run(
        [*MMSURGERY, "inspect", str(two_aux)], capture_output=True, text=True, env={"COLUMNS": "250", "PATH": ""}
    )
    assert text.returncode == 0, text.stderr
    assert "qkv (aux 1)" in text.stdout and "qkv (aux 2)" in text.stdout and "2 auxiliaries" in text.stdout
    png = two_aux.with_suffix(".png")
    assert run("inspect", two_aux, "--plot", png).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- finer λ ---------------------------------------------------------------------------------------------------


def test_per_qkv_pairs_three_scales_on_a_fused_qkv_and_folds_exactly(tmp_path) -> None:
    target, aux = save_vit(tmp_path / "t.safetensors", 0), save_vit(tmp_path / "a.safetensors", 1)
    paired = tmp_path / "p.safetensors"
    r = run("pair", target, aux, "-o", paired, "--scale", "per-qkv")
    assert r.returncode == 0, r.stderr
    with safe_open(str(paired), "pt") as f:
        assert f.get_slice("blocks.0.attn.qkv.cross_modal_scale").get_shape() == [3, 1]
        assert f.get_slice("blocks.0.mlp.fc1.cross_modal_scale").get_shape() == [1]
        assert f.metadata()[FORMAT_KEY] == "paired/2" and f.metadata()["mmsurgery.scale_mode"] == "per-qkv"
    model = tiny_vit(0)
    pathway.attach(model, paired)
    randomize_scales(model)
    qkv = model.blocks[0].attn.qkv
    lam = pathway.pathway_modules(model)["blocks.0.attn.qkv"].cross_modal_scale.detach()
    w = qkv.parametrizations.weight.original.detach()
    aux_w = qkv.parametrizations.weight[0].aux_weight.detach()
    d = w.shape[1]
    for i in range(3):  # chunk i of the merged qkv uses λ_i alone: what split q/k/v linears would each get
        rows = slice(i * d, (i + 1) * d)
        assert torch.equal(qkv.weight[rows], w[rows] + lam[i, 0] * aux_w[rows])
    trained = tmp_path / "trained.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(trained))
    assert run("fold", trained, "-o", tmp_path / "plain.safetensors").returncode == 0
    merged = qkv.weight.detach().clone()
    pathway.fold(model)
    folded = load_file(str(tmp_path / "plain.safetensors"))["blocks.0.attn.qkv.weight"]
    assert torch.equal(folded, merged) and torch.equal(folded, model.blocks[0].attn.qkv.weight)
    assert not torch.equal(folded, w)
    gate = run("verify", tmp_path / "plain.safetensors", "--against", trained)
    assert gate.returncode == 0, gate.stdout + gate.stderr


def test_per_channel_on_a_gpt2_conv1d_target(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50)
    torch.manual_seed(0)
    target_model = transformers.GPT2Model(config).eval()
    torch.manual_seed(1)
    aux_model = transformers.GPT2Model(config)
    save_file({k: v.contiguous() for k, v in target_model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    save_file({k: v.contiguous() for k, v in aux_model.state_dict().items()}, str(tmp_path / "a.safetensors"))
    paired = tmp_path / "p.safetensors"
    r = run("pair", tmp_path / "t.safetensors", tmp_path / "a.safetensors", "-o", paired, "--scale", "per-channel")
    assert r.returncode == 0, r.stderr
    with safe_open(str(paired), "pt") as f:
        assert f.get_slice("h.0.attn.c_attn.cross_modal_scale").get_shape() == [1, 96]  # Conv1D: [in, out]
        assert f.get_slice("h.0.mlp.c_proj.cross_modal_scale").get_shape() == [1, 32]
    pathway.attach(target_model, paired)
    randomize_scales(target_model)
    c_attn = target_model.h[0].attn.c_attn
    lam = c_attn.parametrizations.weight[0].cross_modal_scale.detach()
    w = c_attn.parametrizations.weight.original.detach()
    aux_w = c_attn.parametrizations.weight[0].aux_weight.detach()
    for j in (0, 50, 95):  # output channel j (a column of Conv1D's weight) scaled by its own λ_j
        assert torch.equal(c_attn.weight[:, j], w[:, j] + lam[0, j] * aux_w[:, j])
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unfolded = target_model(ids).last_hidden_state
    trained = tmp_path / "trained.safetensors"
    save_file({k: v.detach().contiguous() for k, v in target_model.state_dict().items()}, str(trained))
    assert run("fold", trained, "-o", tmp_path / "plain.safetensors").returncode == 0
    pathway.fold(target_model)
    folded = load_file(str(tmp_path / "plain.safetensors"))
    for k, v in target_model.state_dict().items():
        assert torch.equal(folded[k], v), k
    assert not torch.equal(folded["h.0.attn.c_attn.weight"], w)
    with torch.no_grad():
        assert torch.equal(target_model(ids).last_hidden_state, unfolded)


def test_inspect_of_a_k2_per_qkv_file_never_imports_torch(tmp_path) -> None:
    """The contract module is torch-free: the console script charts a two-auxiliary, per-qkv λ file without
    importing torch (`-X importtime` lists every module the process imported)."""
    target, a1, a2 = (save_vit(tmp_path / f"{n}.safetensors", s) for n, s in (("t", 0), ("a1", 1), ("a2", 2)))
    paired = tmp_path / "p.safetensors"
    assert run("pair", target, a1, a2, "-o", paired, "--scale", "per-qkv").returncode == 0
    script = Path(sys.executable).with_name("mmsurgery")
    env = {"PYTHONPROFILEIMPORTTIME": "1", "COLUMNS": "250", "PATH": ""}
    r = subprocess.run([str(script), "inspect", str(paired)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qkv (aux 2)" in r.stdout and "~" in r.stdout  # per-qkv λ shown by its mean
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert imported and "torch" not in imported


def test_a_linear_one_auxiliary_cannot_pair_is_skipped_for_all(tmp_path) -> None:
    """Every pathway carries all k auxiliaries: the MLP of a narrower second auxiliary does not fit, so the MLP
    linears get no pathway at all (reported in both plans, naming the auxiliary), and --strict refuses."""
    target, a1 = save_vit(tmp_path / "t.safetensors", 0), save_vit(tmp_path / "a1.safetensors", 1)
    a2 = tmp_path / "a2.safetensors"
    save_file(tiny_vit(2, mlp_hidden=64).state_dict(), str(a2))
    out = tmp_path / "p.safetensors"
    r = run("pair", target, a1, a2, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    plans = json.loads(r.stdout)["plans"]
    assert {p["role"] for p in plans[0]["pairs"]} == {p["role"] for p in plans[1]["pairs"]} == {"qkv", "attn_out"}
    reasons = [s["reason"] for s in plans[0]["skips"]]
    assert reasons and all(x.startswith("auxiliary 2 skips it") for x in reasons)
    assert set(find_pathways({k: v.shape for k, v in load_file(str(out)).items()})) == {
        f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")
    }
    strict = run("pair", target, a1, a2, "-o", tmp_path / "s.safetensors", "--strict")
    assert strict.returncode == 2 and "--strict" in strict.stderr and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("drop", ["aux_weight_1", "cross_modal_scale_1"])
def test_fold_refuses_a_half_second_pathway_in_one_line(two_aux, tmp_path, drop) -> None:
    state = load_file(str(two_aux))
    del state[f"blocks.1.attn.proj.{drop}"]
    bad = tmp_path / "half.safetensors"
    save_file(state, str(bad))
    r = run("fold", bad, "-o", tmp_path / "out.safetensors")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "blocks.1.attn.proj" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.safetensors").exists()
