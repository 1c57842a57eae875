"""verify as a pipeline: each stage module alone over one run context, typed results that round-trip through JSON
and JUnit, the memory rule (models built when first needed, released when no later stage needs them, outputs
computed once), `--stages`, and the up-front refusal of a gate too big for the machine."""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pathway_fixtures import tiny_pair, trained_like
from safetensors.torch import load_file, save_file

import mmsurgery.verify.context as context_module
from mmsurgery.checkpoint import TensorInfo, open_checkpoint
from mmsurgery.errors import BadInputError
from mmsurgery.fold import fold_file
from mmsurgery.models.vit import VisionTransformer, ViTConfig
from mmsurgery.paired_format import open_paired
from mmsurgery.verify import Report, cost, fold_stage, keys, latency, load_arch, memory, onnx_stage, verify, weights
from mmsurgery.verify.context import NEEDS, STAGES, Options, RunContext
from mmsurgery.verify.gate import _run_stages

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> SimpleNamespace:
    """A trained-looking paired tiny ViT (λ ≠ 0, every tensor moved) and its fold."""
    d = tmp_path_factory.mktemp("pipeline")
    trained_like(tiny_pair(d), d / "trained.safetensors")
    plain = fold_file(d / "trained.safetensors", d / "plain.safetensors").output
    return SimpleNamespace(dir=d, plain=plain, trained=d / "trained.safetensors")


def _options(ck: SimpleNamespace, **overrides: object) -> Options:
    values: dict[str, object] = {
        "plain": ck.plain,
        "against": ck.trained,
        "onnx": True,
        "arch": load_arch("vit"),
        "batch_sizes": (1, 3),
        "atol": None,
        "rtol": None,
        "max_latency_ratio": None,
        "heads": None,
        "opset": 20,
        "seed": 0,
        "latency_warmup": 0,
        "latency_runs": 2,
        "weights_ulps": 0,
        "inputs_file": None,
        "given_inputs": None,
        "export_cache": None,
        "stages": STAGES,
    }
    return Options(**(values | overrides))  # type: ignore[arg-type]


@contextlib.contextmanager
def _context(ck: SimpleNamespace, tmp_path: Path, **overrides: object):
    options = _options(ck, **overrides)
    with open_checkpoint(options.plain) as plain, open_paired(options.against) as paired:
        yield RunContext(options=options, plain=plain, paired=paired, tmp=tmp_path)


def _roundtrip(result) -> dict:
    """The result through the JSON report and the JUnit file, as a pipeline reads them."""
    report = Report(stages=(result,), inputs={"plain": "p"}, tolerances={}, versions={}, seconds=1.0)
    data = json.loads(json.dumps(report.to_json()))
    case = ET.fromstring(report.to_junit().split("?>", 1)[1]).find(".//testcase")
    assert case is not None and case.get("name") == result.name
    if result.status == "fail":
        assert case.find("failure") is not None and case.find("failure").get("message") == result.message
    else:
        assert json.loads(case.find("system-out").text.split("\n", 1)[1]) == data["stages"][0]["numbers"]
    return data["stages"][0]


def test_each_stage_module_runs_alone_and_its_result_round_trips(ck, tmp_path) -> None:
    with _context(ck, tmp_path) as ctx:
        w = weights.run(ctx)
        assert isinstance(w, weights.WeightsResult) and w.status == "pass", w.message
        assert w.identical_tensors == w.numbers["identical_tensors"] > 0 and w.differing_tensors == 0
        assert ("rule", "bit-identical") in w.headline()

        k = keys.run(ctx)
        assert isinstance(k, keys.KeysResult) and k.status == "pass", k.message
        assert k.plain_keys == len(VisionTransformer(CFG).state_dict()) and k.leftover_pathway == 0

        f = fold_stage.run(ctx)
        assert isinstance(f, fold_stage.FoldStageResult) and f.status == "pass", f.message
        assert f.max_abs <= 1e-6 and f.pathway_effect_max_abs > 1e-3  # not a trivial comparison
        assert ctx.unfolded_outputs is not None and set(ctx.unfolded_outputs) == {1, 3}

        o = onnx_stage.run(ctx)
        assert isinstance(o, onnx_stage.OnnxResult) and o.status == "pass", o.message
        assert o.max_abs is not None and o.max_abs < 1e-4 and o.export_seconds is not None
        assert "unfolded" in o.numbers["compared"]
        assert (tmp_path / "plain.onnx").is_file() and (tmp_path / "plain.onnx.data").is_file()  # external data

        c = cost.run(ctx)
        assert isinstance(c, cost.CostResult) and c.status == "pass", c.message
        assert c.params == c.numbers["reference_params"] and c.flops == c.numbers["reference_flops"] > 0
        assert c.node_count is not None and c.node_count > 0

        lat = latency.run(ctx)
        assert isinstance(lat, latency.LatencyResult) and lat.status == "pass" and lat.ratio == 1.0

    for result in (w, k, f, o, c, lat):
        stage = _roundtrip(result)
        assert stage["name"] == result.name and stage["status"] == result.status
        assert stage["message"] == result.message
        for label, value in result.headline():  # what the table shows is what the report holds
            assert value is not None, label


def test_a_failing_stage_result_round_trips_with_its_numbers(ck, tmp_path) -> None:
    sd = load_file(ck.plain)
    sd["blocks.0.mlp.fc1.weight"][3, 5] += 1e-3
    save_file(sd, tmp_path / "edited.safetensors")
    with _context(ck, tmp_path, plain=tmp_path / "edited.safetensors") as ctx:
        w = weights.run(ctx)
    assert w.status == "fail" and w.differing_tensors == 1 and "blocks.0.mlp.fc1.weight" in w.message
    stage = _roundtrip(w)
    assert stage["numbers"]["differing"][0]["name"] == "blocks.0.mlp.fc1.weight"


def test_models_are_built_once_when_needed_and_released_when_no_later_stage_needs_them(
    ck, tmp_path, monkeypatch
) -> None:
    built: dict[str, weakref.ref] = {}
    alive_at_build: dict[str, list[str]] = {}
    real_build = RunContext.build

    def build(self, state, metadata, what):
        gc.collect()
        alive_at_build[what] = [w for w, ref in built.items() if ref() is not None]
        model = real_build(self, state, metadata, what)
        built[what] = weakref.ref(model)
        return model

    forwards: list[int] = []
    real_forward = context_module.forward

    def forward(model, inputs):
        forwards.append(len(inputs))
        return real_forward(model, inputs)

    monkeypatch.setattr(RunContext, "build", build)
    monkeypatch.setattr(context_module, "forward", forward)
    with _context(ck, tmp_path) as ctx:
        results = _run_stages(ctx, STAGES, False, None)
        assert [r.status for r in results] == ["pass"] * 6, [r.message for r in results]
        assert ctx.built == ["unfolded", "plain"]  # each model once; the reference shares PLAIN's tensors
        assert alive_at_build["plain"] == []  # the model with W and W_aux was gone before PLAIN's was built
        assert ctx._plain is None and ctx.session is None  # released after the last stage that needed them
        gc.collect()
        assert all(ref() is None for ref in built.values())
    assert forwards == [2]  # PLAIN's outputs once (both batch sizes), reused by the fold and onnx stages


def test_needs_releases_plain_before_latency_and_keeps_the_session() -> None:
    after_cost = frozenset().union(*(NEEDS[s] for s in ("latency",)))
    assert "plain" not in after_cost and "session" in after_cost
    assert NEEDS["weights"] == frozenset()  # streams both files: holds no model


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("mmsurgery")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True)


def test_stages_runs_only_the_chosen_ones(ck, tmp_path) -> None:
    r = _cli("verify", ck.plain, "--against", ck.trained, "--stages", "keys,weights", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    status = {s["name"]: (s["status"], s["message"]) for s in data["stages"]}
    assert status["weights"][0] == status["keys"][0] == "pass"
    assert all(status[s] == ("skip", "not chosen (--stages)") for s in ("fold", "onnx", "cost", "latency"))
    assert data["inputs"]["stages"] == ["weights", "keys"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--stages", "onnx"), "the onnx stage needs --onnx"),
        (("--stages", "weights,bogus"), "--stages 'weights,bogus': choose from weights, keys, fold"),
        (("--memory-limit", "lots"), "--memory-limit 'lots': give a size such as 8G"),
    ],
)
def test_bad_stage_choices_are_one_line_exit_2(ck, args, said) -> None:
    r = _cli("verify", ck.plain, "--against", ck.trained, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert said in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert len((r.stdout + r.stderr).strip().splitlines()) == 1


def test_a_gate_too_big_for_the_machine_fails_at_once_saying_what_it_needs(ck) -> None:
    r = _cli("verify", ck.plain, "--against", ck.trained, "--onnx", "--memory-limit", "100M")
    assert r.returncode == 2, r.stdout + r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert "this gate needs about" in out and "0.1 GB is available" in out and "no stage fits" in out
    assert "the weights stage proves every weight with flat memory" in out


def _vit_infos(width: int, depth: int, mlp: int, tokens: int, patch: int) -> dict[str, TensorInfo]:
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, tokens, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "attn.qkv.weight": (3 * width, width),
            p + "attn.proj.weight": (width, width),
            p + "mlp.fc1.weight": (mlp, width),
            p + "mlp.fc2.weight": (width, mlp),
        }
    shapes |= {"head.weight": (1000, width)}
    return {k: TensorInfo(k, "float32", s) for k, s in shapes.items()}


def test_the_estimate_says_which_stages_fit_at_deployment_sizes() -> None:
    """ViT-L/16: the estimate meets the memory goal (≤ 12 bytes per parameter), and a 2 GB runner is told to run
    the streaming stages only."""
    plain = _vit_infos(1024, 24, 4096, 197, 16)
    paired = plain | {
        k.replace(".weight", ".aux_weight"): TensorInfo(k.replace(".weight", ".aux_weight"), "float32", i.shape)
        for k, i in plain.items()
        if k.startswith("blocks.")
    }
    need = memory.estimate(plain, paired, STAGES)
    params = sum(i.numel for i in plain.values())
    assert need.peak / params <= 12
    assert need.per_stage["weights"] < 1.5e9 and need.per_stage["keys"] == memory.BASE
    with pytest.raises(BadInputError, match=r"needs about .* the stages that fit: --stages weights,keys \("):
        memory.check_fits(need, 2 * 2**30)
    memory.check_fits(need, 64 * 2**30)  # fits: no error


def test_parse_bytes() -> None:
    assert memory.parse_bytes("8G") == 8 * 2**30 and memory.parse_bytes("3.5GB") == int(3.5 * 2**30)
    assert memory.parse_bytes("512m") == 512 * 2**20 and memory.parse_bytes(1000) == 1000
    for bad in ("", "0G", "-1G", "8 apples"):
        with pytest.raises(BadInputError):
            memory.parse_bytes(bad)


def test_python_api_takes_the_same_choices(ck) -> None:
    report = verify(ck.plain, against=ck.trained, stages=["weights"])
    assert [s.status for s in report.stages] == ["pass", "skip", "skip", "skip", "skip", "skip"]


def _retrained(ck: SimpleNamespace, d: Path, seed: int) -> tuple[Path, Path]:
    """Another training run of the same pair: every tensor moved again, λ redrawn; and its fold."""
    sd = load_file(ck.trained)
    with open_checkpoint(ck.trained) as f:
        meta = dict(f.metadata)
    g = torch.Generator().manual_seed(seed)
    for k in sd:
        sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, d / f"trained-{seed}.safetensors", metadata=meta)
    plain = fold_file(d / f"trained-{seed}.safetensors", d / f"plain-{seed}.safetensors").output
    return d / f"trained-{seed}.safetensors", plain


@pytest.mark.slow
def test_a_repeated_gate_binds_the_cached_graph_and_still_fails_a_wrong_weight(ck, tmp_path) -> None:
    """The export cache through the console script, as CI meets it (the same architecture, new weights each time):
    the 1st and 2nd gates export (two agreeing exports, whose weights differ, make the entry bindable), the 3rd
    binds its PLAIN's weights to the cached graph and exports nothing. A PLAIN with edited weights, gated through
    the same cache, still fails weights, fold and onnx."""
    cache = tmp_path / "cache"
    runs = [(ck.trained, ck.plain), _retrained(ck, tmp_path, 5), _retrained(ck, tmp_path, 6)]
    seen = []
    for i, (trained, plain) in enumerate(runs):
        r = _cli(
            "verify", plain, "--against", trained, "--onnx", "--export-cache", cache, "--json", tmp_path / f"{i}.json"
        )
        assert r.returncode == 0, r.stdout + r.stderr
        data = json.loads((tmp_path / f"{i}.json").read_text())
        assert data["passed"], data["failed"]
        onnx = next(s for s in data["stages"] if s["name"] == "onnx")
        seen.append(onnx["numbers"]["export_cache"])
    assert seen[2] == "hit" and seen[0] != "hit" and seen[1] == "stored", seen
    trained, plain = runs[2]
    sd = load_file(plain)
    sd["blocks.1.mlp.fc2.weight"] += 1e-3 * torch.randn(sd["blocks.1.mlp.fc2.weight"].shape)
    with open_checkpoint(plain) as f:  # keep the recorded config: without it the head count, so the key, differs
        save_file(sd, tmp_path / "edited.safetensors", metadata=dict(f.metadata))
    r = _cli(
        "verify",
        tmp_path / "edited.safetensors",
        "--against",
        trained,
        "--onnx",
        "--export-cache",
        cache,
        "--json",
        tmp_path / "e.json",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    data = json.loads((tmp_path / "e.json").read_text())
    status = {s["name"]: s["status"] for s in data["stages"]}
    assert status["weights"] == status["fold"] == status["onnx"] == "fail", status
    onnx = next(s for s in data["stages"] if s["name"] == "onnx")
    assert onnx["numbers"]["export_cache"] == "hit"  # the bound graph carries the edited weight, and ORT sees it
