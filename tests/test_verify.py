"""`mmsurgery verify`: a correct fold passes every stage; each kind of broken fold fails its stage, with numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pathway_fixtures import tiny_pair, trained_like
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmsurgery.cli import _bare_onnx
from mmsurgery.errors import BadInputError
from mmsurgery.fold import fold_file
from mmsurgery.models.vit import METADATA_KEY, VisionTransformer, ViTConfig
from mmsurgery.verify import Report, StageResult, load_arch, verify
from mmsurgery.verify.compare import Comparison
from mmsurgery.verify.latency import latency_result, measure
from mmsurgery.verify.onnx_stage import export

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
STAGES = ["weights", "keys", "fold", "onnx", "cost", "latency"]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> SimpleNamespace:
    """A trained paired tiny ViT (random non-zero λ, W_aux moved), its fold, and broken variants of the fold."""
    d = tmp_path_factory.mktemp("verify")
    trained = trained_like(tiny_pair(d), d / "trained.safetensors")
    sd = load_file(trained)
    g = torch.Generator().manual_seed(2)
    plain = fold_file(trained, d / "plain.safetensors").output
    plain_sd, plain_meta = load_file(plain), _metadata(plain)

    # one weight tensor off by noise of std 1e-3 (a single element off by 1e-3 moves the logits by ~1e-4: the fold
    # stage catches that too, the onnx stage's looser tolerance does not)
    w = plain_sd["blocks.1.mlp.fc2.weight"]
    perturbed = {**plain_sd, "blocks.1.mlp.fc2.weight": w + 1e-3 * torch.randn(w.shape, generator=g)}
    save_file(perturbed, d / "perturbed.safetensors", metadata=plain_meta)

    leftover = {**plain_sd, "blocks.0.attn.qkv.aux_weight": sd["blocks.0.attn.qkv.aux_weight"]}
    save_file(leftover, d / "leftover.safetensors", metadata=plain_meta)

    tanh_model = VisionTransformer(ViTConfig(**{**CFG.to_dict(), "gelu_approximate": "tanh"}))
    tanh_model.load_state_dict(plain_sd, strict=True)
    export(tanh_model.eval(), torch.randn(2, 3, 16, 16), d / "tanh.onnx", opset=20)
    return SimpleNamespace(dir=d, plain=plain, trained=d / "trained.safetensors", target=d / "target.safetensors")


def _stages(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    assert data["schema"] == "mmsurgery.verify/1"
    return {s["name"]: s for s in data["stages"]}


@pytest.mark.slow
def test_correct_fold_passes_every_stage(ck, tmp_path) -> None:
    """The installed console script in a subprocess, as a pipeline runs it."""
    script = Path(sys.executable).with_name("mmsurgery")
    cmd = [script, "verify", ck.plain, "--against", ck.trained, "--onnx", "--json", tmp_path / "r.json"]
    r = subprocess.run([str(c) for c in [*cmd, "--junit", tmp_path / "j.xml"]], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout and "FAILED" not in r.stdout and r.stderr == ""
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is True and data["failed"] == []
    stages = _stages(tmp_path / "r.json")
    assert list(stages) == STAGES and {s["status"] for s in stages.values()} == {"pass"}
    fold = stages["fold"]["numbers"]
    assert fold["max_abs"] <= 1e-6 and fold["pathways"] == 8
    assert fold["pathway_effect_max_abs"] > 1e-3  # the comparison is not trivial
    assert stages["onnx"]["numbers"]["max_abs"] < 1e-4
    cost = stages["cost"]["numbers"]
    assert cost["differences"] == [] and cost["node_count"] == cost["reference_node_count"] > 0
    assert cost["graph"]["gelu_approximate"] == {"none": 2}
    # verify exported PLAIN's graph itself, and the reference is the same class and config: one export, not two
    assert "PLAIN's own export" in cost["reference"]
    assert stages["latency"]["numbers"]["same_graph"] is True and stages["latency"]["numbers"]["ratio"] == 1.0
    assert stages["latency"]["numbers"]["median_ms"] > 0
    suites = ET.parse(tmp_path / "j.xml").getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == ["mmsurgery.verify"]
    cases = suites[0].findall("testcase")
    assert [c.get("name") for c in cases] == STAGES
    assert suites[0].get("failures") == "0" and not suites[0].findall(".//failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.xml", "r.json"]  # atomic: no temp files left


@pytest.mark.slow
def test_perturbed_weight_fails_fold_and_onnx_with_numbers(ck, tmp_path, cli) -> None:
    r = cli(
        "verify",
        ck.dir / "perturbed.safetensors",
        "--against",
        ck.trained,
        "--onnx",
        tmp_path / "perturbed.onnx",  # a new path: exported there and kept
        "--json",
        tmp_path / "r.json",
        "--junit",
        tmp_path / "j.xml",
    )
    assert r.code == 1, r.out + r.err
    assert "FAILED (weights, fold, onnx)" in r.out
    stages = _stages(tmp_path / "r.json")
    assert {n: s["status"] for n, s in stages.items()} == {
        "weights": "fail",
        "keys": "pass",
        "fold": "fail",
        "onnx": "fail",
        "cost": "pass",
        "latency": "pass",
    }
    for name in ("fold", "onnx"):
        s = stages[name]
        worst = s["numbers"]["worst"]
        assert 1e-6 < s["numbers"]["max_abs"] < 1e-2
        assert "max abs" in s["message"] and f"at {worst['where']}" in s["message"]
        assert f"batch {worst['batch_size']}" in s["message"] and "would pass with atol" in s["message"]
        assert worst["passing_atol"] == pytest.approx(s["numbers"]["max_abs"])
    # ORT itself agrees with PLAIN in PyTorch: the difference is the fold, not the exporter
    assert stages["onnx"]["numbers"]["vs_plain_pytorch_max_abs"] < 1e-5
    assert stages["onnx"]["numbers"]["source"] == "exported" and (tmp_path / "perturbed.onnx").is_file()
    failures = ET.parse(tmp_path / "j.xml").getroot().findall(".//failure")
    assert len(failures) == 3 and "blocks.1.mlp.fc2.weight" in failures[0].get("message", "")
    assert "max abs" in failures[1].get("message", "")


def test_leftover_pathway_tensor_fails_keys(ck, cli, tmp_path) -> None:
    r = cli("verify", ck.dir / "leftover.safetensors", "--against", ck.trained, "--json", tmp_path / "r.json")
    assert r.code == 1
    stages = _stages(tmp_path / "r.json")
    keys = stages["keys"]
    assert keys["status"] == "fail" and "blocks.0.attn.qkv.aux_weight" in keys["message"]
    assert keys["numbers"]["leftover_pathway"] == ["blocks.0.attn.qkv.aux_weight"]
    assert stages["fold"]["status"] == "pass"  # the values are right; the file still is not deployable
    assert stages["onnx"]["status"] == stages["latency"]["status"] == "skip"


def test_plain_checkpoint_of_another_model_fails_keys_against_paired(ck, tmp_path) -> None:
    other = ViTConfig(**{**CFG.to_dict(), "num_classes": 7})
    save_file(VisionTransformer(other).state_dict(), tmp_path / "other.safetensors")
    report = verify(tmp_path / "other.safetensors", against=ck.trained, heads=2)
    keys = report.stage("keys")
    assert not report.passed and keys.status == "fail" and "shape" in keys.message
    assert {m["key"] for m in keys.numbers["vs_paired"]["shape_mismatch"]} == {"head.weight", "head.bias"}
    fold = report.stage("fold")
    assert fold.status == "fail" and "shape [1, 7] vs expected [1, 5]" in fold.message


@pytest.mark.slow
def test_tanh_gelu_graph_fails_cost(ck, tmp_path) -> None:
    report = verify(ck.plain, onnx=ck.dir / "tanh.onnx", batch_sizes=[1, 3])
    cost = report.stage("cost")
    assert cost.status == "fail" and "Gelu approximate: tanh vs none" in cost.message
    assert cost.numbers["params"] == cost.numbers["reference_params"]  # only the graph tells them apart
    assert report.stage("onnx").numbers["source"] == "given"
    assert report.stage("fold").status == "skip"


def test_tanh_in_metadata_fails_cost_without_a_graph(ck, tmp_path) -> None:
    meta = _metadata(ck.plain)
    meta[METADATA_KEY] = json.dumps({**json.loads(meta[METADATA_KEY]), "gelu_approximate": "tanh"})
    save_file(load_file(ck.plain), tmp_path / "tanh.safetensors", metadata=meta)
    report = verify(tmp_path / "tanh.safetensors", against=ck.trained)
    # tiny activations: tanh and exact GELU agree to ~1e-7 here, so only the structural check sees it
    cost = report.stage("cost")
    assert cost.status == "fail" and "config gelu_approximate: tanh vs none" in cost.message
    assert cost.numbers["config"]["gelu_approximate"] == "tanh"
    assert cost.numbers["reference_config"]["gelu_approximate"] == "none"


@pytest.mark.parametrize(
    "args",
    [
        ["missing.safetensors"],
        ["{plain}", "--against", "missing.safetensors"],
        ["{plain}", "--arch", "no_such_module_xyz:factory"],
        ["{plain}", "--arch", "test_verify:no_such_factory"],
        ["{plain}", "--arch", "vit2"],
        ["{plain}", "--arch", "test_verify:tiny_mlp", "--heads", "2"],
        ["{plain}", "--batch-sizes", "4"],
        ["{plain}", "--batch-sizes", "1,x"],
        ["{plain}", "--batch-sizes", "0,4"],
        ["{plain}", "--onnx=graph.txt"],
        ["{plain}", "--onnx", "{dir}/garbage.onnx"],
        ["{plain}", "--onnx", "notes.txt"],
        ["{plain}", "--onnx", "{dir}/no/such/dir/x.onnx"],
        ["{plain}", "--inputs", "{dir}/garbage.onnx"],
        ["{plain}", "--atol", "-1"],
        ["{plain}", "--json", "{dir}/no/such/dir/r.json"],
    ],
)
def test_bad_input_or_usage_exits_2(ck, cli, args) -> None:
    (ck.dir / "garbage.onnx").write_bytes(b"this is not protobuf\xff\xfe")
    r = cli("verify", *[a.format(plain=ck.plain, dir=ck.dir) for a in args])
    assert r.code == 2, (args, r.out, r.err)


def test_bad_arch_message_says_what_and_how(ck, cli) -> None:
    r = cli("verify", ck.plain, "--arch", "no_such_module_xyz:factory")
    assert "cannot import 'no_such_module_xyz'" in r.err and "PYTHONPATH" in r.err


def test_bare_onnx_flag_is_rewritten() -> None:
    assert _bare_onnx(["verify", "p.safetensors", "--onnx"]) == ["verify", "p.safetensors", "--onnx=auto"]
    assert _bare_onnx(["verify", "--onnx", "p.safetensors"]) == ["verify", "--onnx=auto", "p.safetensors"]
    assert _bare_onnx(["verify", "--onnx", "--json", "r.json"])[1] == "--onnx=auto"
    assert _bare_onnx(["verify", "p", "--onnx", "m.onnx"]) == ["verify", "p", "--onnx", "m.onnx"]


# A custom architecture for `--arch test_verify:tiny_mlp` (the tests folder is on sys.path).
class TinyMlp(nn.Module):
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, width), nn.GELU(), nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def example_input(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.randn(batch_size, 8, generator=generator)


class NoExamples(TinyMlp):
    example_input = None  # type: ignore[assignment]


def tiny_mlp(state, metadata) -> nn.Module:
    return TinyMlp(state["fc1.weight"].shape[0], state["fc2.weight"].shape[0])


def tiny_mlp_without_examples(state, metadata) -> nn.Module:
    return NoExamples(state["fc1.weight"].shape[0], state["fc2.weight"].shape[0])


def test_custom_arch_factory_with_example_input_or_inputs_file(tmp_path) -> None:
    torch.manual_seed(0)
    save_file(TinyMlp(16, 3).state_dict(), tmp_path / "mlp.safetensors")
    report = verify(tmp_path / "mlp.safetensors", arch="test_verify:tiny_mlp")
    assert report.passed and report.stage("keys").status == report.stage("cost").status == "pass"
    assert report.stage("cost").numbers["params"] == 8 * 16 + 16 + 16 * 3 + 3
    with pytest.raises(BadInputError, match="example_input"):
        verify(tmp_path / "mlp.safetensors", arch="test_verify:tiny_mlp_without_examples")
    save_file({"input": torch.randn(5, 8)}, tmp_path / "x.safetensors")
    report = verify(
        tmp_path / "mlp.safetensors",
        arch="test_verify:tiny_mlp_without_examples",
        inputs=tmp_path / "x.safetensors",
        batch_sizes="2,5",
    )
    assert report.passed and report.inputs["input_shapes"] == {"2": [2, 8], "5": [5, 8]}
    with pytest.raises(BadInputError, match="at least 6"):
        verify(
            tmp_path / "mlp.safetensors",
            arch="test_verify:tiny_mlp",
            inputs=tmp_path / "x.safetensors",
            batch_sizes="1,6",
        )


class Unexportable(TinyMlp):
    def forward(self, x: Tensor) -> Tensor:
        if float(x.sum()) > 1e9:  # data-dependent Python control flow: torch.export cannot trace it
            return x
        return super().forward(x)


def tiny_unexportable(state, metadata) -> nn.Module:
    return Unexportable(state["fc1.weight"].shape[0], state["fc2.weight"].shape[0])


@pytest.mark.slow
def test_factory_graphs_are_both_exported_and_kept_atomically(tmp_path) -> None:
    torch.manual_seed(0)
    save_file(TinyMlp(16, 3).state_dict(), tmp_path / "mlp.safetensors")
    report = verify(tmp_path / "mlp.safetensors", arch="test_verify:tiny_mlp", onnx=tmp_path / "mlp.onnx")
    assert report.passed, [s.message for s in report.stages]
    assert report.stage("onnx").numbers["source"] == "exported" and (tmp_path / "mlp.onnx").is_file()
    cost = report.stage("cost")
    assert "PLAIN's own export" not in cost.numbers["reference"]  # a factory's code is not ours: two exports
    assert cost.numbers["node_count"] == cost.numbers["reference_node_count"] > 0
    assert "same_graph" not in report.stage("latency").numbers
    # the weights beside the graph (external data), nothing else left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data", "mlp.safetensors"]


@pytest.mark.slow
def test_a_failed_export_is_a_failed_stage_not_a_crash(tmp_path, cli) -> None:
    torch.manual_seed(0)
    save_file(TinyMlp(16, 3).state_dict(), tmp_path / "mlp.safetensors")
    r = cli("verify", tmp_path / "mlp.safetensors", "--arch", "test_verify:tiny_unexportable", "--onnx")
    assert r.code == 1, r.out + r.err
    assert "FAILED (onnx)" in r.out and "torch.onnx.export failed" in r.out and r.err == ""


def test_comparison_reports_where_and_the_tolerance_that_would_pass() -> None:
    expected = torch.zeros(2, 3)
    expected[1] = torch.tensor([1.0, 2.0, 4.0])
    actual = expected.clone()
    actual[1, 2] += 0.02
    c = Comparison.from_tensors(actual, expected, atol=1e-5, rtol=1e-4, batch_size=2)
    assert not c.passed and c.mismatched == 1 and c.total == 6
    assert c.where == (1, 2) and c.flat_index == 5
    assert c.max_abs == pytest.approx(0.02) and c.max_rel == pytest.approx(0.005)
    assert c.passing_atol == pytest.approx(0.02) and c.passing_rtol == pytest.approx((0.02 - 1e-5) / 4)
    assert c.passing_rtol is not None
    assert Comparison.from_tensors(actual, expected, atol=1e-5, rtol=c.passing_rtol * 1.000001, batch_size=2).passed
    assert Comparison.from_tensors(actual, expected, atol=c.passing_atol, rtol=0, batch_size=2).passed
    assert "max abs 0.02 at [1, 2]" in c.describe() and "would pass with atol 0.02" in c.describe()
    at_zero = Comparison.from_tensors(torch.tensor([1e-3]), torch.tensor([0.0]), atol=1e-5, rtol=1, batch_size=1)
    assert not at_zero.passed and at_zero.passing_rtol is None and "no rtol" in at_zero.describe()
    nan = Comparison.from_tensors(torch.tensor([float("nan")]), torch.tensor([1.0]), atol=1, rtol=1, batch_size=1)
    assert not nan.passed
    shape = Comparison.from_tensors(torch.zeros(2), torch.zeros(3), atol=1, rtol=1, batch_size=1)
    assert not shape.passed and "shape" in shape.describe()


def test_report_json_and_junit(tmp_path) -> None:
    stages = (
        StageResult(name="keys", status="pass", seconds=0.1, message="ok", numbers={"n": 3}),
        StageResult(
            name="fold",
            status="fail",
            seconds=0.2,
            message="max abs 0.1 at [0, 1]",
            numbers={"max_abs": 0.1, "max_rel": float("inf")},
        ),
        StageResult(name="onnx", status="skip", message="no --onnx given"),
    )
    report = Report(
        stages=stages,
        inputs={"plain": "p.safetensors"},
        tolerances={"dtype": "float32"},
        versions={"torch": "x"},
        seconds=0.3,
    )
    assert not report.passed and report.failed == ["fold"]
    data = json.loads(report.write_json(tmp_path / "r.json").read_text())  # strict JSON: inf became a string
    assert data["passed"] is False and data["stages"][1]["numbers"]["max_rel"] == "inf"
    root = ET.fromstring(report.write_junit(tmp_path / "j.xml").read_text())
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "3" and suite.get("failures") == "1"
    assert suite.get("skipped") == "1"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["fold"].find("failure").get("message") == "max abs 0.1 at [0, 1]"
    assert cases["onnx"].find("skipped") is not None and cases["keys"].find("failure") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.xml", "r.json"]


def test_latency_fails_only_above_the_given_ratio() -> None:
    numbers = measure(lambda: sum(range(100)), lambda: sum(range(100)), warmup=1, runs=5)
    assert numbers["runs"] == 5 and numbers["ratio"] > 0
    slow = {**numbers, "ratio": 1.5, "batch_size": 1}
    assert latency_result(slow, None).status == "pass"
    assert latency_result(slow, 2.0).status == "pass"
    failed = latency_result(slow, 1.2)
    assert failed.status == "fail" and "1.5" in failed.message and "1.2" in failed.message


def test_builtin_vit_has_no_buffers_so_verify_may_build_it_on_meta() -> None:
    """verify builds the built-in ViT on the meta device and assigns every tensor strictly (arch._on_meta): sound
    only while the model has no state outside its state dict. The model then holds the checkpoint's own tensors
    (one copy of the weights, not two)."""
    assert list(VisionTransformer(CFG).buffers()) == []
    arch = load_arch("vit", 2)
    state = VisionTransformer(CFG).state_dict()
    model = arch.build(state, {})
    assert all(p.device.type == "meta" for p in model.parameters())
    arch.load(model, state, assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(t.data_ptr() == state[k].data_ptr() for k, t in model.state_dict().items())
    assert set(model.state_dict()) == set(VisionTransformer(CFG).state_dict())


def test_importing_verify_loads_neither_onnx_nor_onnxruntime() -> None:
    code = "import sys, mmsurgery.verify; print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
