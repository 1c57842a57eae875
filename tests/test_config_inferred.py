"""A gate must not prove a model it guessed: a ViT's head count is not in its weights, so `pair` records where it
came from, marks a guess as one (`"inferred": ["num_heads"]` in `mmsurgery.vit`), and `verify` says so in every
report and refuses to keep an exported graph of a guessed configuration unless `--heads` confirms it.

The scene of issue 22: a 32-wide ViT trained with 2 heads, saved without metadata. The head-dim-64 rule makes it 1
head. Every check runs the installed console script in a subprocess on real files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery.models.vit import METADATA_KEY, VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
SCRIPT = Path(sys.executable).with_name("mmsurgery")


def mmsurgery(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def vit_meta(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {})[METADATA_KEY])


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, nothing on stdout, exactly one `error:` line on stderr, no traceback, no literal backslash-n."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert r.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "\\n" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> SimpleNamespace:
    """target and aux (2-head, 32 wide, no metadata), paired without --heads, the paired file after "training"
    (non-zero λ), and its fold."""
    d = tmp_path_factory.mktemp("guess")
    torch.manual_seed(0)
    save_file(VisionTransformer(CFG).state_dict(), d / "target.safetensors")
    torch.manual_seed(1)
    save_file(VisionTransformer(CFG).state_dict(), d / "aux.safetensors")
    r = mmsurgery("pair", d / "target.safetensors", d / "aux.safetensors", "-o", d / "p.safetensors")
    assert r.returncode == 0, r.stderr
    with safe_open(d / "p.safetensors", "pt") as f:
        meta = dict(f.metadata() or {})
    sd = load_file(d / "p.safetensors")
    for k in sd:
        if k.endswith("cross_modal_scale"):
            sd[k] = torch.full_like(sd[k], 0.3)
    save_file(sd, d / "trained.safetensors", metadata=meta)
    assert mmsurgery("fold", d / "trained.safetensors", "-o", d / "plain.safetensors").returncode == 0
    return SimpleNamespace(dir=d, pair_out=r.stdout, plain=d / "plain.safetensors", trained=d / "trained.safetensors")


def test_pair_marks_a_guessed_head_count_and_says_so(vit) -> None:
    recorded = vit_meta(vit.dir / "p.safetensors")
    assert recorded["num_heads"] == 1 and recorded["inferred"] == ["num_heads"]  # the rule's guess, marked
    out = " ".join(vit.pair_out.split())  # rich may wrap the warning
    assert "ViT config inferred, not read: 1 attention heads for width 32, from the head-dim-64 rule" in out
    assert "--heads N" in out
    assert vit_meta(vit.plain)["inferred"] == ["num_heads"]  # fold carries the record to PLAIN
    r = mmsurgery("pair", vit.dir / "target.safetensors", vit.dir / "aux.safetensors", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vit"] == {
        "config": {k: v for k, v in recorded.items() if k != "inferred"},
        "heads_from": "the head-dim-64 rule",
        "inferred": ["num_heads"],
    }


@pytest.mark.parametrize(
    ("source", "heads_from"),
    [
        ("--heads", "--heads"),
        ("config.json", "config.json"),
        ("model_args", "config.json"),
        ("metadata", "the target's mmsurgery.vit metadata"),
    ],
)
def test_pair_records_the_head_count_wherever_it_can_be_learned(tmp_path, vit, source, heads_from) -> None:
    """--heads, a Hugging Face config.json beside the target (transformers' `num_attention_heads`, or timm's
    `model_args.num_heads`), or the target's own `mmsurgery.vit`: 2 heads, recorded without `inferred`."""
    target, args = tmp_path / "target.safetensors", []
    sd = load_file(vit.dir / "target.safetensors")
    if source == "metadata":
        save_file(sd, target, metadata={METADATA_KEY: json.dumps(CFG.to_dict())})
    else:
        save_file(sd, target)
    if source == "--heads":
        args = ["--heads", "2"]
    elif source == "config.json":
        (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2}))
    elif source == "model_args":
        (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_x", "model_args": {"num_heads": 2}}))
    out = tmp_path / "p.safetensors"
    r = mmsurgery("pair", target, vit.dir / "aux.safetensors", "-o", out, *args)
    assert r.returncode == 0, r.stderr
    recorded = vit_meta(out)
    assert recorded["num_heads"] == 2 and "inferred" not in recorded
    assert "config inferred" not in r.stdout and "ViT config: 2 attention heads (from " in r.stdout
    assert heads_from in " ".join(r.stdout.split())


def test_pair_ignores_a_config_json_of_another_width(tmp_path, vit) -> None:
    """A config.json beside the target that describes a 64-wide model says nothing about this one: still a guess."""
    target = tmp_path / "target.safetensors"
    save_file(load_file(vit.dir / "target.safetensors"), target)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    out = tmp_path / "p.safetensors"
    r = mmsurgery("pair", target, vit.dir / "aux.safetensors", "-o", out)
    assert r.returncode == 0, r.stderr
    assert vit_meta(out) == {**CFG.to_dict(), "num_heads": 1, "inferred": ["num_heads"]}


def test_verify_reports_an_inferred_config(vit, tmp_path) -> None:
    """The table's header and verdict and the JSON report's `inputs.config_inferred` say the gate proved a guess;
    `--heads 2` confirms the trained model's head count and the note goes away."""
    r = mmsurgery(
        "verify", vit.plain, "--against", vit.trained, "--json", tmp_path / "r.json", "--junit", tmp_path / "j.xml"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("config inferred, not recorded: num_heads 1 (the head-dim-64 rule")  # under the title
    assert "PASSED" in lines[-1] and "config inferred (num_heads 1), not confirmed" in lines[-1]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema"] == "mmsurgery.verify/1" and data["inputs"]["config_inferred"] == {"num_heads": 1}
    assert 'name="config_inferred" value="{&quot;num_heads&quot;: 1}"' in (tmp_path / "j.xml").read_text()

    r = mmsurgery("verify", vit.plain, "--against", vit.trained, "--heads", "2", "--json", tmp_path / "r2.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "config inferred" not in r.stdout
    data = json.loads((tmp_path / "r2.json").read_text())
    assert data["inputs"]["config_inferred"] == {} and data["inputs"]["heads"] == 2
    fold = next(s for s in data["stages"] if s["name"] == "fold")
    assert fold["status"] == "pass" and fold["numbers"]["pathway_effect_max_abs"] > 0  # not a trivial comparison


def test_an_old_file_without_the_inferred_list_still_reads(vit, tmp_path) -> None:
    """A file written before the `inferred` list existed: its `mmsurgery.vit` is taken as recorded, as always."""
    old = tmp_path / "old.plain.safetensors"
    with safe_open(vit.plain, "pt") as f:
        meta = dict(f.metadata() or {})
    meta[METADATA_KEY] = json.dumps({k: v for k, v in json.loads(meta[METADATA_KEY]).items() if k != "inferred"})
    save_file(load_file(vit.plain), old, metadata=meta)
    r = mmsurgery("verify", old, "--stages", "keys,cost", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["inputs"]["config_inferred"] == {}
    assert ViTConfig.from_dict(vit_meta(vit.plain)) == ViTConfig(**{**CFG.to_dict(), "num_heads": 1})


def test_verify_refuses_to_keep_a_graph_of_an_inferred_config(vit, tmp_path) -> None:
    """`--onnx FILE.onnx` (new) would keep a deployable graph of the guess: exit 2, one line, nothing written. The
    refusal is specific: with --heads, or with a temporary graph, the gate goes on (and here stops at the memory
    check, the next thing before any work, so no export runs)."""
    kept = tmp_path / "model.onnx"
    line = one_error_line(mmsurgery("verify", vit.plain, "--against", vit.trained, "--onnx", kept))
    assert f"--onnx {kept}: the model's configuration is inferred, not recorded (num_heads 1" in line
    assert "pass --heads N" in line
    assert not kept.exists() and list(tmp_path.iterdir()) == []

    for args in (["--heads", "2", "--onnx", kept], ["--onnx"]):
        line = one_error_line(mmsurgery("verify", vit.plain, *args, "--memory-limit", "1K"))
        assert "memory" in line and "inferred" not in line
    assert not kept.exists()
