"""`mmsurgery verify PLAIN --against PAIRED --arch hf`: the model comes from the folder's `config.json`.

The inputs are what a Hugging Face user has: PAIRED is `save_pretrained` of a tiny model after `pathway.attach`
(random W_aux, non-zero λ), PLAIN is `save_pretrained` of the same model after `pathway.fold`. Both folders hold
the on-disk names `save_pretrained` writes (`vit.encoder.layer.0.attention.attention.query.aux_weight`), which
differ from the model's own (`vit.layers.0.attention.q_proj`). The console script runs in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmsurgery import pathway
from mmsurgery.hf import to_model_names

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (in the dev extra)")

import hf_vit_arch  # noqa: E402  (tests/ is on sys.path; needs transformers)

STAGES = ["weights", "keys", "fold", "onnx", "cost", "latency"]
WEIGHTS = "model.safetensors"


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def _vit() -> nn.Module:
    return transformers.ViTForImageClassification(hf_vit_arch.config())


def _folders(make: Callable[[], nn.Module], d: Path, seed: int) -> SimpleNamespace:
    """PAIRED (`save_pretrained` after attach, λ ~ 0.5 + N(0, 0.3²)) and PLAIN (`save_pretrained` after fold),
    plus a λ-negated fold: right for another PAIRED, wrong for this one."""
    torch.manual_seed(seed)
    model = make().eval()
    model.save_pretrained(d / "target")
    disk = load_file(d / "target" / WEIGHTS)
    g = torch.Generator().manual_seed(seed + 1)
    paired = dict(disk)
    for key, w in disk.items():
        if ".encoder.layer." in key and key.endswith(".weight") and w.ndim == 2:
            module = key.removesuffix(".weight")
            paired[f"{module}.aux_weight"] = 0.05 * torch.randn(w.shape, generator=g)
            paired[f"{module}.cross_modal_scale"] = 0.5 + 0.3 * torch.randn(1, generator=g)
    lambdas = [k for k in paired if k.endswith(".cross_modal_scale")]

    def fold_saved(state: dict[str, torch.Tensor], paired_dir: Path | None, plain_dir: Path) -> None:
        torch.manual_seed(seed)
        m = make().eval()
        named = to_model_names(m, state)  # on-disk names -> the model's, pathway keys included
        pathway.attach(m, named)
        m.load_state_dict(named, strict=True)
        if paired_dir is not None:
            m.save_pretrained(paired_dir)
        pathway.fold(m)
        m.save_pretrained(plain_dir)

    fold_saved(paired, d / "paired", d / "plain")
    fold_saved({k: -v if k in lambdas else v for k, v in paired.items()}, None, d / "plain-negated")
    return SimpleNamespace(dir=d, paired=d / "paired", plain=d / "plain", disk=disk, pathways=len(lambdas))


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> SimpleNamespace:
    f = _folders(_vit, tmp_path_factory.mktemp("hf-vit"), seed=0)
    # PLAIN with one element of one folded weight off by 1e-3, as a bare file next to a config.json
    tampered = f.dir / "tampered"
    tampered.mkdir()
    shutil.copy(f.plain / "config.json", tampered / "config.json")
    sd = load_file(f.plain / WEIGHTS)
    name = "vit.encoder.layer.1.intermediate.dense.weight"
    sd[name] = sd[name].clone()
    sd[name].view(-1)[1] += 1e-3
    save_file(sd, tampered / "plain.safetensors", metadata={"format": "pt"})
    f.tampered, f.tampered_key = tampered / "plain.safetensors", name
    return f


def _mmsurgery(*args: object) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("mmsurgery")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=240)


def _stages(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    assert data["schema"] == "mmsurgery.verify/1"
    return {s["name"]: s for s in data["stages"]}


def test_save_pretrained_writes_on_disk_names_for_the_pathway_too(vit) -> None:
    """The fixture's premise: PAIRED's keys are the target's on-disk keys plus `P.aux_weight` /
    `P.cross_modal_scale` of on-disk `P`, which are not the model's names; PLAIN's are exactly the target's."""
    paired = set(load_file(vit.paired / WEIGHTS))
    aux = {k.removesuffix(".aux_weight") for k in paired if k.endswith(".aux_weight")}
    assert len(aux) == vit.pathways == 12  # q, k, v, attention output, intermediate, output: 2 layers
    assert "vit.encoder.layer.0.attention.attention.query" in aux
    assert {f"{p}.weight" for p in aux} <= set(vit.disk)
    assert paired - {f"{p}.{leaf}" for p in aux for leaf in ("aux_weight", "cross_modal_scale")} == set(vit.disk)
    assert set(load_file(vit.plain / WEIGHTS)) == set(vit.disk)
    assert "vit.encoder.layer.0.attention.attention.query.weight" not in _vit().state_dict()  # names do differ


@pytest.mark.slow
def test_correct_fold_passes_every_stage_with_onnx(vit, tmp_path) -> None:
    r = _mmsurgery(
        "verify", vit.plain, "--against", vit.paired, "--arch", "hf", "--onnx", "--json", tmp_path / "r.json"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout and r.stderr == ""
    stages = _stages(tmp_path / "r.json")
    assert list(stages) == STAGES and {s["status"] for s in stages.values()} == {"pass"}, stages
    assert stages["weights"]["numbers"]["pathways"] == 12
    assert stages["keys"]["numbers"]["plain_keys"] == stages["keys"]["numbers"]["model_keys"] == len(vit.disk)
    fold = stages["fold"]["numbers"]
    # the in-memory fold and the file fold compute W + λ·W_aux alike: folded and unfolded agree exactly
    assert fold["max_abs"] == 0 and fold["pathways"] == 12
    assert fold["pathway_effect_max_abs"] > 1e-3  # the comparison is not trivial
    onnx = stages["onnx"]["numbers"]
    assert onnx["max_abs"] < 1e-4  # the default float32 onnx tolerance; ORT kernels differ from PyTorch's
    cost = stages["cost"]["numbers"]
    assert cost["differences"] == [] and cost["config"]["model_class"] == "ViTForImageClassification"
    assert cost["graph"]["inputs"] == ["pixel_values: float32[batch, 3, 16, 16]"]
    assert cost["graph"]["outputs"] == ["logits: float32[batch, 5]"]
    assert "PLAIN's own export" in cost["reference"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inputs"]["arch"] == "hf" and report["inputs"]["input_shapes"]["4"] == [4, 3, 16, 16]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tampered", "negated"])
def test_a_wrong_plain_fails_the_weights_stage(vit, tmp_path, which) -> None:
    """One element +1e-3 (a bare file: the config is read from its folder), or the fold of PAIRED with every λ
    negated (a folder): exit 1, the weights stage names the tensor, and the fold stage fails too."""
    plain = vit.tampered if which == "tampered" else vit.dir / "plain-negated"
    r = _mmsurgery("verify", plain, "--against", vit.paired, "--arch", "hf", "--json", tmp_path / "r.json")
    assert r.returncode == 1, r.stdout + r.stderr
    stages = _stages(tmp_path / "r.json")
    assert stages["weights"]["status"] == "fail" and "not bit-identical" in stages["weights"]["message"]
    assert stages["keys"]["status"] == "pass"
    assert stages["fold"]["status"] == "fail"
    differing = stages["weights"]["numbers"]["differing"]
    if which == "tampered":
        assert [d["name"] for d in differing] == [vit.tampered_key] and differing[0]["over"] == 1
        assert vit.tampered_key in stages["weights"]["message"]
    else:
        assert stages["weights"]["numbers"]["differing_tensors"] == 12


@pytest.mark.slow
def test_text_model_passes_with_token_ids_and_attention_mask(tmp_path_factory, tmp_path) -> None:
    f = _folders(_bert, tmp_path_factory.mktemp("hf-bert"), seed=3)
    r = _mmsurgery("verify", f.plain, "--against", f.paired, "--arch", "hf", "--onnx", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    stages = _stages(tmp_path / "r.json")
    assert list(stages) == STAGES and {s["status"] for s in stages.values()} == {"pass"}, stages
    assert stages["fold"]["numbers"]["pathway_effect_max_abs"] > 1e-4 and stages["fold"]["numbers"]["max_abs"] == 0
    inputs = json.loads((tmp_path / "r.json").read_text())["inputs"]
    assert inputs["input_names"] == ["input_ids", "attention_mask"]
    assert inputs["all_input_shapes"]["4"] == [[4, 16], [4, 16]]
    graph = stages["cost"]["numbers"]["graph"]
    assert graph["inputs"] == ["input_ids: int64[batch, 16]", "attention_mask: int64[batch, 16]"]
    assert graph["outputs"] == ["logits: float32[batch, 3]"]


def test_example_inputs_come_from_the_config(vit) -> None:
    """Token ids in [0, vocab_size), a length within max_position_embeddings, a right-padded mask with one full
    row; pixel values of the config's image size. Seeded: the same seed gives the same batch."""
    from mmsurgery.verify.archs import load_arch

    arch = load_arch("hf", checkpoints=[vit.plain])
    model = arch.build({}, {})
    (pixels,) = arch.example_input(model, 3, torch.Generator().manual_seed(0))
    assert pixels.shape == (3, 3, 16, 16) and pixels.dtype == torch.float32
    bert = _bert()
    d = vit.dir / "bert-config"
    bert.config.save_pretrained(d)
    text = load_arch("hf", checkpoints=[d])
    model = text.build({}, {})
    ids, mask = text.example_input(model, 8, torch.Generator().manual_seed(0))
    again, _ = text.example_input(model, 8, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again) and ids.shape == mask.shape == (8, 16)
    assert int(ids.min()) >= 0 and int(ids.max()) < 64 and ids.dtype == torch.int64
    assert bool(mask[0].all()) and not bool(mask.all())  # one full row, some padding
    assert torch.equal(mask, mask.cummin(dim=1).values)  # right padding: no 1 after a 0
    # --inputs FILE: `input` is input_ids; an attention_mask in the file is used, else all ones
    from mmsurgery.verify.inputs import make_inputs

    given = make_inputs(text, model, [1, 4], 0, {"input": ids, "attention_mask": mask})
    assert torch.equal(given[4][0], ids[:4]) and torch.equal(given[4][1], mask[:4])
    (_, ones) = make_inputs(text, model, [1, 4], 0, {"input": ids})[4]
    assert bool(ones.all()) and ones.shape == (4, 16)


def test_uninitialised_build_keeps_non_persistent_buffers(tmp_path) -> None:
    """verify builds HF models without initialising weights (it loads every tensor); buffers outside the state dict
    (BERT's position_ids) must still be right, which the meta device + to_empty would not give."""
    from mmsurgery.verify.archs import load_arch

    bert = _bert().eval()
    bert.save_pretrained(tmp_path)
    arch = load_arch("hf", checkpoints=[tmp_path])
    model = arch.build({}, {})
    arch.load(model, load_file(tmp_path / WEIGHTS))
    buffers = dict(bert.named_buffers())
    assert buffers and all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    x = (torch.arange(16).reshape(1, 16) * 3) % 64
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=x).logits, bert(input_ids=x).logits)


def test_tied_weights_may_be_absent_as_save_pretrained_writes_them(tmp_path) -> None:
    """GPT-2 ties lm_head to the token embedding and save_pretrained leaves lm_head.weight out: the keys stage does
    not expect it and the load ties it."""
    from mmsurgery.verify.archs import load_arch

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=24)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    gpt2.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert "lm_head.weight" not in saved
    arch = load_arch("hf", checkpoints=[tmp_path / WEIGHTS])
    model = arch.build({}, {})
    assert "lm_head.weight" not in arch.state_shapes(model)
    arch.load(model, saved)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(RuntimeError, match="Missing key"):
        arch.load(arch.build({}, {}), {k: v for k, v in saved.items() if k != "transformer.wte.weight"})


def test_no_config_is_bad_input_in_one_line(vit, tmp_path, cli) -> None:
    save_file(load_file(vit.plain / WEIGHTS), tmp_path / "plain.safetensors")
    r = _mmsurgery("verify", tmp_path / "plain.safetensors", "--arch", "hf")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "no config.json" in r.stderr, r.stderr
    r = cli("verify", tmp_path / "missing.safetensors", "--arch", "hf")
    assert r.code == 2 and "missing.safetensors: no such file or folder" in r.err
    r = cli("verify", vit.plain, "--arch", "hf", "--heads", "2")
    assert r.code == 2 and "--heads applies to the built-in --arch vit only" in r.err


def test_config_from_paired_folder_and_no_transformers_for_inspect(vit, tmp_path) -> None:
    from mmsurgery.verify.hf_arch import find_config

    save_file(load_file(vit.plain / WEIGHTS), tmp_path / "plain.safetensors")
    assert find_config([tmp_path / "plain.safetensors", vit.paired]) == vit.paired / "config.json"
    assert find_config([vit.plain, vit.paired]) == vit.plain / "config.json"
    code = "import sys, mmsurgery.verify, mmsurgery.verify.hf_arch, mmsurgery.cli; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
