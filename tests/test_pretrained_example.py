"""examples/pretrained.py (issue 15): the user's entry point run end to end in --quick mode, and its controls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from examples_loader import load_example

from mmsurgery.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pretrained.py"


def _example() -> ModuleType:
    return load_example("pretrained")


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(EXAMPLE), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # on a busy machine 2 spinning threads take 2-3x as long
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_quick_run_pairs_trains_folds_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    proc = _run("--quick", "--out", out, "--plot")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["pretrain_seed"] for r in rows if r["phase"] == "pretrain"] == [0, 1]
    for seed in (0, 1):  # the pretrained encoder: the built-in ViT's names, no head, cached under --out
        with open_checkpoint(out / f"pretrain-seed{seed}.safetensors") as ck:
            assert "blocks.5.mlp.fc2.weight" in ck.infos and "head.weight" not in ck.infos
    assert {r["lr"] for r in rows if r["phase"] == "sweep"} == {1e-3, 3e-3}
    assert all("test_acc" not in r for r in rows if r["phase"] == "sweep")  # chosen on validation only

    main = {(r["arm"], r["seed"]): r for r in rows if r["phase"] == "main"}
    assert set(main) == {(a, s) for a in ("plain", "minilm", "permuted") for s in (0, 1)}
    assert all(r["pretrain_seed"] == r["seed"] % 2 for r in main.values())
    for seed in (0, 1):
        plain = main["plain", seed]
        assert plain["scales"] == {} and "folded_test_acc" not in plain
        for arm in ("minilm", "permuted"):
            row = main[arm, seed]
            assert len(row["scales"]) == 24 and all(v != 0 for v in row["scales"].values())  # 24 pathways that moved
            assert row["folded_test_acc"] == row["test_acc"] and row["fold_max_abs_diff"] == 0.0
            # λ starts at 0: step 0 is the plain model bit for bit (same pretrained target, same head, same batch);
            # after it the pathway changes the model, so the last loss differs from plain's.
            assert row["first_loss"] == plain["first_loss"]
            assert row["final_loss"] != plain["final_loss"]
    paired = out / "cache" / "paired-permuted-seed1.safetensors"
    with open_checkpoint(paired) as ck:
        assert sum(k.endswith(".aux_weight") for k in ck.infos) == 24
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "lambda.png").stat().st_size > 0
    assert "| minilm | 2 |" in proc.stdout and "| 2/2 |" in proc.stdout

    again = _run("--quick", "--out", out)  # resumes: every run is done, nothing is added
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    refused = _run("--out", out, "--seeds", "1", "--pretrain-steps", "3")  # full-size settings: refused
    assert refused.returncode == 2 and "other settings" in refused.stderr


def _rows(w: torch.Tensor) -> torch.Tensor:
    """The multiset of rows, each as its multiset of values: equal iff one is a row-and-column permutation away."""
    rows = w.contiguous().sort(dim=1).values.contiguous()
    return rows[rows.sum(1).argsort()]  # sorted rows sum in the same order: equal rows get equal keys


def test_permuted_control_keeps_every_value_and_moves_them(minilm_path: Path) -> None:
    example = _example()
    with open_checkpoint(minilm_path) as ck:
        keys = example.block_linear_keys(ck.infos)
        state = ck.to_state_dict()
    assert len(keys) == 6 * 6 and "encoder.layer.0.attention.self.query.weight" in keys  # q, k, v, o, fc1, fc2
    permuted = example.permuted_like(state, keys, seed=0)
    assert set(permuted) == set(state)
    for k in keys:
        a, b = state[k], permuted[k]
        assert b.shape == a.shape and b.dtype == a.dtype
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)  # the same multiset of values
        assert not torch.equal(a, b) and (a != b).float().mean() > 0.9  # almost every value moved
        assert torch.equal(_rows(a), _rows(b)) and torch.equal(_rows(a.T), _rows(b.T))  # rows and columns kept
    big = "encoder.layer.3.intermediate.dense.weight"
    sv_a, sv_b = torch.linalg.svdvals(state[big]), torch.linalg.svdvals(permuted[big])
    assert torch.allclose(sv_a, sv_b, rtol=1e-4, atol=1e-5)  # permutations keep the spectrum
    untouched = [k for k in state if k not in keys]
    assert untouched and all(permuted[k] is state[k] for k in untouched)  # embeddings, biases, norms: as they were
    assert torch.equal(example.permuted_like(state, keys, seed=0)[big], permuted[big])  # seeded
    assert not torch.equal(example.permuted_like(state, keys, seed=1)[big], permuted[big])

    gaussian = example.gaussian_like(state, keys, seed=0)
    a, g = state[big], gaussian[big]
    assert abs(float(g.mean() - a.mean())) < 1e-3 and abs(float(g.std() / a.std()) - 1) < 1e-2
    assert not torch.equal(a.flatten().sort().values, g.flatten().sort().values)
