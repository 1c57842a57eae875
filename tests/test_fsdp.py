"""FSDP2 (`fully_shard`) with the pathway on two gloo ranks, and `mmsurgery fold` / `inspect` of the DCP folder
the run saved. The worker (tests/fsdp_worker.py) checks the state-dict APIs and `scales` on the ranks; here the
console script folds the sharded DCP folder and the gathered full state, and the two must agree bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pathway_fixtures import tiny_vit
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCRIPT = Path(sys.executable).with_name("mmsurgery")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_fsdp2_two_ranks_gloo_dcp_folder_folds_bit_identically(tmp_path: Path, cli) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "fsdp_worker.py"), "--out", str(tmp_path), "--steps", "3"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("FSDP_OK") == 2, proc.stdout
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    # the sharded folder, read directly, and the rank-0 gather of the same state: the same plain weights, bit for
    # bit (exact: the same fold_weight on the same bits); the folded weights differ from the untrained model's
    _cli("fold", tmp_path / "dcp", "-o", tmp_path / "from_dcp.safetensors")
    assert cli("fold", tmp_path / "full.paired.safetensors", "-o", tmp_path / "from_full.safetensors").code == 0
    a, b = load_file(tmp_path / "from_dcp.safetensors"), load_file(tmp_path / "from_full.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    untrained = tiny_vit(seed=0).state_dict()
    assert list(a) == list(untrained)
    assert all(not torch.equal(a[k], untrained[k]) for k in a if k.startswith("blocks.") and k.endswith(".weight"))

    # inspect shows λ per layer: the values scales() read on rank 0 alone
    assert "λ per layer: 8 pathways" in cli("inspect", tmp_path / "dcp").out
    report = json.loads(cli("inspect", tmp_path / "dcp", "--json").out)
    lambdas = {x["layer"]: x["scale"] for x in report["pathway"]["layers"]}
    assert report["format"] == "dcp" and lambdas == json.loads((tmp_path / "scales.json").read_text())
    assert len(lambdas) == 8 and all(v != 0.0 for v in lambdas.values())

    # a training checkpoint {"model", "optim"}: the model entry is found without --key; the optimizer is skipped
    train = json.loads(cli("inspect", tmp_path / "dcp_train", "--json").out)
    assert train["unwrap"]["path"] == ["model"] and "optim" in train["unwrap"]["ignored"]
    assert {x["layer"]: x["scale"] for x in train["pathway"]["layers"]} == lambdas


def test_scales_gather_is_the_plain_read_without_sharding() -> None:
    """Without FSDP (no DTensor) `gather=True` reads the same values and needs no process group."""
    from pathway_fixtures import make_paired_state

    from mmsurgery.pathway import attach, scales

    model = tiny_vit()
    state = make_paired_state(model)
    attach(model, state)
    model.load_state_dict({**state, **{k: v + 0.5 for k, v in state.items() if k.endswith("cross_modal_scale")}})
    assert scales(model, gather=True) == scales(model) and set(scales(model).values()) == {0.5}
