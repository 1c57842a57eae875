"""timm's own ViT through mmsurgery: pair, attach, fold and verify on a real `timm.create_model` model.

Opt-in (`make test-timm`): timm needs torchvision, which needs its own venv here, so `make test` deselects the
`timm` marker. timm is imported inside the tests, never at collection, so collecting this file without timm (or
with a torchvision that fails to import) cannot break the main suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pathway_fixtures import batch, tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmsurgery import pathway
from mmsurgery.models.vit import vit_from_checkpoint, vit_small

pytestmark = pytest.mark.timm

IMG = 32  # ViT-S/16 at 32 px: a 2x2 patch grid; every weight has its 224-px shape except pos_embed (5 vs 197)
CLASSES = 10
# Built-in ViT vs timm on the same weights: the same float32 math in the same order (LayerNorm eps 1e-6, fused
# qkv, `scaled_dot_product_attention`, erf GELU), so only kernel choice can differ; 1e-5 absolute on logits of
# size ~1 allows float32 rounding through 12 blocks and nothing else: on these weights 12 heads instead of 6 move
# the logits by 4e-2, the tanh GELU by 2e-4. Measured with timm 1.0.31 / torch 2.14.1 CPU: 0 (bit-identical).
CROSS_IMPL_ATOL = 1e-5


def _timm():
    return pytest.importorskip("timm")


def _vit_s(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _timm().create_model("vit_small_patch16_224", pretrained=False, num_classes=CLASSES, img_size=IMG).eval()


def _mmsurgery(*args: object) -> subprocess.CompletedProcess[str]:
    """The installed console script in a subprocess, as a user runs it."""
    script = Path(sys.executable).with_name("mmsurgery")
    assert script.is_file(), "the console script is installed beside the interpreter (pip install -e .)"
    r = subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"mmsurgery {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}{r.stderr}"
    return r


def _bits(t: Tensor) -> Tensor:
    assert t.dtype == torch.float32, t.dtype
    return t.detach().contiguous().view(torch.int32)  # bit for bit: -0.0 != +0.0, NaN payloads count


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_path) -> SimpleNamespace:
    """A timm ViT-S saved as safetensors → `mmsurgery pair` with the real MiniLM → attached to the timm model →
    non-zero λ (as training leaves it) → saved → `mmsurgery fold`, and the same model folded in memory."""
    d = tmp_path_factory.mktemp("timm")
    model = _vit_s()
    target = d / "vit_s.safetensors"
    save_file(model.state_dict(), target)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        untouched = model(x)

    plan = json.loads(_mmsurgery("pair", target, minilm_path, "-o", d / "paired.safetensors", "--json").stdout)
    pathway.attach(model, d / "paired.safetensors")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pw in pathway.pathway_modules(model).values():
            pw.cross_modal_scale.copy_(torch.randn(1, generator=g) * 0.3 + 0.2)
        attached = model(x)
    with safe_open(d / "paired.safetensors", "pt") as f:
        meta = f.metadata()
    save_file(model.state_dict(), d / "trained.safetensors", metadata=meta)  # the paired format = state_dict()

    _mmsurgery("fold", d / "trained.safetensors", "-o", d / "plain.safetensors")
    pathway.fold(model)
    with torch.no_grad():
        folded = model(x)
    return SimpleNamespace(
        dir=d, target=target, plain=d / "plain.safetensors", trained=d / "trained.safetensors", plan=plan,
        model=model, x=x, untouched=untouched, attached=attached, folded=folded,
    )  # fmt: skip


@pytest.mark.slow  # the shared `run` fixture: ~15 s once (pair and fold in subprocesses, 0.5 GB of files)
def test_pair_with_real_minilm_pairs_every_block_linear(run) -> None:
    assert run.plan["paired"] == 48 and run.plan["skipped"] == 0
    assert run.plan["target"]["family"] == "timm-vit" and run.plan["aux"]["family"] == "bert"
    paired = load_file(run.dir / "paired.safetensors")
    assert sum(k.endswith(".aux_weight") for k in paired) == 48
    assert paired["blocks.11.mlp.fc2.aux_weight"].shape == (384, 1536)  # MiniLM is 384 wide like ViT-S


@pytest.mark.slow
def test_cli_fold_equals_in_memory_fold_bit_for_bit(run) -> None:
    cli_folded = load_file(run.plain)
    in_memory = run.model.state_dict()
    assert not pathway.is_attached(run.model)
    assert list(cli_folded) == list(load_file(run.target))  # the plain model's keys (files list them sorted)
    assert sorted(in_memory) == sorted(cli_folded)
    for k, v in in_memory.items():
        assert torch.equal(_bits(cli_folded[k]), _bits(v)), k


@pytest.mark.slow
def test_folded_timm_model_computes_what_the_attached_one_did(run) -> None:
    # Exact (tolerance 0): the folded weight is bit-identical to the effective weight W + λ·W_aux that the
    # parametrized forward fed the same timm code (foldmath's one expression), on the same CPU.
    assert torch.equal(run.folded, run.attached)
    fresh = _vit_s(seed=7)
    fresh.load_state_dict(load_file(run.plain), strict=True)  # the CLI's file, into a new timm model
    with torch.no_grad():
        assert torch.equal(fresh(run.x), run.attached)
    effect = (run.attached - run.untouched).abs().max().item()
    assert effect > 1e-2, effect  # λ ≠ 0 really changed the model: the equalities above are not trivial


@pytest.mark.slow
def test_builtin_vit_loads_timm_state_strictly_and_matches_timm(run) -> None:
    for path, timm_logits in ((run.target, run.untouched), (run.plain, run.folded)):
        state = load_file(path)
        ours = vit_from_checkpoint(state).eval()  # strict; num_heads 6 from the head-dim-64 rule
        assert ours.config == vit_small(img_size=IMG, num_classes=CLASSES)
        assert sorted(ours.state_dict()) == sorted(state)
        with torch.no_grad():
            torch.testing.assert_close(ours(run.x), timm_logits, atol=CROSS_IMPL_ATOL, rtol=0)
    # the paired file the timm model was trained into resumes in the built-in ViT too (what verify's fold stage does)
    trained = load_file(run.trained)
    ours = vit_from_checkpoint(pathway.split_paired(trained)[0]).eval()
    pathway.attach(ours, trained)
    ours.load_state_dict(trained, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(run.x), run.attached, atol=CROSS_IMPL_ATOL, rtol=0)
    assert (run.folded - run.untouched).abs().max() > 100 * CROSS_IMPL_ATOL  # the two comparisons differ


@pytest.mark.slow
def test_verify_builtin_arch_passes_on_the_folded_timm_checkpoint(run, tmp_path) -> None:
    r = _mmsurgery("verify", run.plain, "--against", run.trained, "--arch", "vit", "--json", tmp_path / "r.json")
    assert "PASSED" in r.stdout and "FAILED" not in r.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    stages = {s["name"]: s for s in data["stages"]}
    assert data["passed"] is True
    assert {n: s["status"] for n, s in stages.items()} == {
        "weights": "pass", "keys": "pass", "fold": "pass", "onnx": "skip", "cost": "pass", "latency": "skip",
    }  # fmt: skip
    assert stages["fold"]["numbers"]["pathways"] == 48
    assert stages["fold"]["numbers"]["pathway_effect_max_abs"] > 1e-2


@pytest.mark.parametrize("direction", ["ours_into_timm", "timm_into_ours"])
def test_tiny_vit_matches_timm_both_ways(direction: str) -> None:
    timm_vit = _timm().models.vision_transformer
    theirs = timm_vit.VisionTransformer(
        img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2, qkv_bias=True
    ).eval()
    ours = tiny_vit(seed=5)
    if direction == "ours_into_timm":
        theirs.load_state_dict(ours.state_dict(), strict=True)
    else:
        ours = vit_from_checkpoint(theirs.state_dict(), num_heads=2).eval()
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=CROSS_IMPL_ATOL, rtol=0)
        assert not torch.equal(tiny_vit(seed=6)(x), ours(x))
