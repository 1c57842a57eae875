"""Copies of an attached model are independent: an EMA (`AveragedModel`), plain deep copies, `torch.save(model)`.

torch's parametrize gives each module a class of its own and keeps `weight` on it; `copy.deepcopy` used to share
that class, so folding one copy deleted `weight` from every other one. Outputs here are compared exactly
(`torch.equal`): `fold_weight` computes the same float32 expression as the unfolded forward (test_pathway.py).
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pathway_fixtures import batch, make_paired_state, tiny_vit, train_steps
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mmsurgery.pathway import attach, fold, is_attached, param_groups, scales

QKV = "blocks.0.attn.qkv"


def _attached(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    plain = tiny_vit(seed)
    paired = make_paired_state(plain)
    return attach(plain, paired), paired


def _fold_is_exact(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fold `model` and check its output equals the unfolded one; returns the folded output."""
    with torch.no_grad():
        unfolded = model(x)
        fold(model)
        folded = model(x)
    assert torch.equal(folded, unfolded)
    assert not is_attached(model)
    return folded


def _public_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(QKV + ".")}


def test_ema_folds_for_export_while_the_live_model_keeps_training() -> None:
    model, paired = _attached()
    x, y = batch()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    opt = torch.optim.AdamW(param_groups(model, 0.05, lr=1e-2), lr=1e-2)

    def step() -> None:
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        model.eval()

    for _ in range(4):
        step()
        ema.update_parameters(model)
    ema.eval()
    assert scales(ema.module) != scales(model)  # the EMA lags the live model: two different pathways
    assert all(v != 0.0 for v in scales(ema.module).values())  # and λ moved, so the folds below are not no-ops

    ema_out = _fold_is_exact(ema.module, x)  # folding the EMA for export ...
    assert is_attached(model) and _public_keys(model) == {
        f"{QKV}.{k}" for k in ("weight", "bias", "aux_weight", "cross_modal_scale")
    }
    for _ in range(3):  # ... leaves the live model training (this step raised AttributeError: no `weight`)
        step()
    live_out = _fold_is_exact(model, x)
    assert not torch.equal(live_out, ema_out)
    assert (
        list(model.state_dict())
        == list(ema.module.state_dict())
        == [k for k in paired if "aux" not in k and "scale" not in k]
    )


@pytest.mark.parametrize("fold_first", ["original", "copy"])
def test_deep_copies_fold_on_their_own(fold_first: str) -> None:
    original, paired = _attached()
    x, y = batch()
    train_steps(original, x, y, steps=2)  # λ ≠ 0 in both copies
    clone = copy.deepcopy(original)
    train_steps(clone, x, y, steps=2)  # the two copies hold different λ and W_aux from here on
    first, second = (original, clone) if fold_first == "original" else (clone, original)
    first_out = _fold_is_exact(first, x)
    state = second.state_dict()
    assert set(state) == set(paired)  # its state-dict hooks survived the other's fold
    second.load_state_dict(state, strict=True)
    train_steps(second, x, y, steps=3)
    second_out = _fold_is_exact(second, x)
    assert not torch.equal(first_out, second_out)


def test_each_copy_caches_its_own_weight() -> None:
    original, _ = _attached()
    clone = copy.deepcopy(original)
    with torch.no_grad():
        clone.get_submodule(QKV).parametrizations.weight[0].cross_modal_scale.fill_(0.5)
    x, _ = batch()
    with torch.no_grad():
        expected = original(x), clone(x)
        assert not torch.equal(*expected)
        with parametrize.cached():  # the cache is keyed by module: the copy must not read the original's weight
            assert all(torch.equal(a, b) for a, b in zip((original(x), clone(x)), expected, strict=True))


def test_torch_save_of_a_whole_attached_model_loads_in_a_fresh_process(tmp_path: Path) -> None:
    model, _ = _attached()
    x, y = batch()
    train_steps(model, x, y, steps=2)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save({"x": x, "state": model.state_dict()}, tmp_path / "io.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # as for any whole module
        torch.load(path, weights_only=True)
    script = f"""
import torch
from mmsurgery.pathway import fold, is_attached
model = torch.load({str(path)!r}, weights_only=False)
io = torch.load({str(tmp_path / "io.pt")!r})
model.load_state_dict(io["state"], strict=True)
assert is_attached(model) and model.state_dict().keys() == io["state"].keys()
with torch.no_grad():
    out = model(io["x"])
    fold(model)
    torch.save({{"out": out, "folded": model(io["x"]), "keys": list(model.state_dict())}}, {str(tmp_path / "out.pt")!r})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert torch.equal(got["out"], model(x))
    assert torch.equal(got["folded"], got["out"])
    train_steps(model, x, y, steps=1)  # the saved model is untouched by the load and fold elsewhere
    _fold_is_exact(model, x)
    assert got["keys"] == list(model.state_dict())


def test_attach_to_one_copy_leaves_a_shared_parametrized_class_alone() -> None:
    class Half(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return b / 2

    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(4, 3))
    parametrize.register_parametrization(original[0], "bias", Half())
    clone = copy.deepcopy(original)  # shares torch's class with the original
    weight = original[0].weight.detach().clone()
    attach(original, {"0.aux_weight": torch.ones_like(weight), "0.cross_modal_scale": torch.zeros(1)}, init_scale=0.5)
    assert "weight" not in vars(type(clone[0])) and "aux_weight" not in vars(type(clone[0]))
    assert torch.equal(original[0].weight, weight + 0.5)
    fold(original)
    assert parametrize.is_parametrized(original[0], "bias") and not hasattr(original[0], "aux_weight")
    x = torch.randn(2, 4)
    assert torch.equal(clone(x), F.linear(x, clone[0].weight, clone[0].bias))
    assert torch.allclose(original(x), clone(x) + 0.5 * x.sum(1, keepdim=True), atol=1e-6)


def test_pickles_name_only_the_five_stable_pathway_globals() -> None:
    """A whole attached model pickles by reference to five names of the pathway; pickles written before
    `mmsurgery/pathway.py` became a package name them `mmsurgery.pathway.<name>`, so they must stay exactly there
    (a move inside the package must not change what a pickle refers to)."""
    import io

    seen: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str):  # type: ignore[override]
            seen.add((module, name))
            return super().find_class(module, name)

    model = attach(tiny_vit(0), make_paired_state(tiny_vit(0)))
    Recording(io.BytesIO(pickle.dumps(model))).load()
    pathway = {(m, n) for m, n in seen if m.startswith("mmsurgery.pathway")}
    names = ("Pathway", "_rebuild_parametrized", "_state_dict_post_hook", "_load_pre_hook", "_load_post_hook")
    assert pathway == {("mmsurgery.pathway", n) for n in names}
