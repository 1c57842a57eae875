"""`mmsurgery inspect`: the rich summary, the JSON schema, and one line + exit 2 for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import CASES, CASES_BY_NAME
from safetensors.torch import save_file
from test_checkpoint import BAD, _malicious


def test_inspect_minilm_json_schema(cli, minilm_path) -> None:
    r = cli("inspect", minilm_path, "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert {"format", "num_tensors", "num_params", "dtypes", "stacks"} <= set(data)
    assert (data["format"], data["num_tensors"], data["num_params"]) == ("safetensors", 104, 22_713_216)
    assert data["dtypes"]["int64"] == {"tensors": 1, "elements": 512}
    (s,) = data["stacks"]
    assert {k: s[k] for k in ("prefix", "depth", "width", "mlp_width", "qkv", "norm")} == {
        "prefix": "encoder.layer",
        "depth": 6,
        "width": 384,
        "mlp_width": 1536,
        "qkv": "split",
        "norm": "post",
    }
    assert len(s["blocks"]) == 6 and set(s["blocks"][5]["roles"]) == {"q", "k", "v", "attn_out", "mlp_in", "mlp_out"}
    assert s["blocks"][0]["roles"]["q"] == {
        "key": "encoder.layer.0.attention.self.query.weight",
        "shape": [384, 384],
        "bias": True,
        "dtype": "float32",
    }


def test_inspect_rich_summary(cli, minilm_path) -> None:
    r = cli("inspect", minilm_path)
    assert r.code == 0
    for text in ("safetensors", "22,713,216", "encoder.layer", "bert", "split", "post", "default", "embeddings"):
        assert text in r.out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inspect_json_per_family(cli, tmp_path, case) -> None:
    sd = case.build()
    if case.wrapper:
        path = tmp_path / "ck.pth"
        torch.save(case.wrapper(sd), path)
    else:
        path = tmp_path / "ck.safetensors"
        save_file(sd, path)
    r = cli("inspect", path, "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    (default,) = [s for s in data["stacks"] if s["default"]]
    assert (default["prefix"], default["family"], default["depth"], default["qkv"], default["norm"]) == (
        case.prefix,
        case.family,
        case.depth,
        case.qkv,
        case.norm,
    )


def test_inspect_key_option_and_ignored_entries(cli, tmp_path) -> None:
    sd = CASES_BY_NAME["timm-vit"].build()
    torch.save({"model": sd, "model_ema": sd, "epoch": 4}, tmp_path / "ck.pth")
    data = json.loads(cli("inspect", tmp_path / "ck.pth", "--json").out)
    assert data["unwrap"] == {"path": ["model_ema"], "alternatives": ["model"], "ignored": {"epoch": "int"}}
    data = json.loads(cli("inspect", tmp_path / "ck.pth", "--json", "--key", "model").out)
    assert data["unwrap"]["path"] == ["model"]
    r = cli("inspect", tmp_path / "ck.pth", "--key", "nope")
    assert r.code == 2 and "no entry 'nope'" in r.err


def _no_blocks(tmp_path):
    p = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, p)
    return p


@pytest.mark.parametrize("name", [*BAD, "malicious", "no-blocks"])
def test_bad_input_one_line_exit_2(cli, tmp_path, name) -> None:
    make = {"malicious": _malicious, "no-blocks": _no_blocks}.get(name) or BAD[name][0]
    r = cli("inspect", make(tmp_path))
    assert r.code == 2
    assert r.out == ""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err


def test_debug_shows_the_traceback(tmp_path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "mmsurgery", "--debug", "inspect", str(tmp_path / "missing.pt")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr and "BadInputError" in p.stderr


def test_usage_error_exit_2(cli) -> None:
    assert cli("inspect").code == 2
    assert cli("no-such-command").code == 2


def _sparse_vit(path: Path) -> int:
    """A sparse 2 GB safetensors file with a real header and data that was never written (reading any tensor
    would page it in). Returns its parameter count."""
    n = 1024 * 1024 * 1024 // 4  # 1 GiB of float32 per tensor
    header = {
        name: {"dtype": "F32", "shape": [n // 1024, 1024], "data_offsets": [i * 4 * n, (i + 1) * 4 * n]}
        for i, name in enumerate(("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"))
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + 2 * 4 * n)
    return 2 * n


def test_inspect_safetensors_reads_header_only_without_torch(tmp_path) -> None:
    """A large file is described from its header: no torch import, no tensor read, well under a second."""
    p = tmp_path / "big.safetensors"
    n = _sparse_vit(p)
    code = (
        "import sys, time, re; t = time.perf_counter(); from mmsurgery.describe import describe;"
        f"d = describe({str(p)!r}); dt = time.perf_counter() - t;"
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1);"
        "print(dt, 'torch' in sys.modules, hwm, d.num_params)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    seconds, torch_loaded, rss_kb, params = float(out[0]), out[1], int(out[2]), int(out[3])
    assert params == n
    assert torch_loaded == "False"
    assert seconds < 1.0  # header only: typically ~0.05 s
    assert rss_kb < 100_000  # peak RSS of the process, far below the 2 GB of data (measured ~17 MB)


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_console_script_inspect_never_imports_torch(tmp_path, as_json) -> None:
    """The installed `mmsurgery` console script, as a user runs it: `-X importtime` (PYTHONPROFILEIMPORTTIME)
    lists every module the process imported, and torch must not be one of them. The wall time is measured by
    benchmarks/inspect_startup.py, not asserted here."""
    p = tmp_path / "big.safetensors"
    _sparse_vit(p)
    script = Path(sys.executable).with_name("mmsurgery")
    assert script.is_file(), "the console script is installed beside the interpreter (pip install -e .)"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    cmd = [str(script), "inspect", str(p), *(["--json"] if as_json else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "blocks" in r.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "mmsurgery.describe" in imported  # the import log is really there
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "numpy", "onnx", "onnxruntime", "safetensors")]
    assert heavy == [], heavy
