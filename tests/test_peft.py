"""PEFT (LoRA) on a model with the pathway: training works, PEFT's own merge loses the adapter, and
`mmsurgery.integrations.peft.merge_and_unload` (fold, then merge) gives the trained model."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pathway_fixtures import make_paired_state
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (in the dev extra)")
peft = pytest.importorskip("peft", reason="peft is an optional extra (in the dev extra)")

import hf_vit_arch  # noqa: E402

from mmsurgery import pathway  # noqa: E402
from mmsurgery.errors import AttachError, BadInputError, FoldError  # noqa: E402
from mmsurgery.integrations.peft import is_peft_model, merge_and_unload  # noqa: E402

TARGETS = ["q_proj", "v_proj", "classifier"]  # two pathway linears per block, and the head, which has none


def _plain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(hf_vit_arch.config()).eval()


def _paired(model: nn.Module) -> dict[str, torch.Tensor]:
    """Random W_aux on the 12 block linears, λ = 0.3 (so the pathway changes the output)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("vit.")]
    paired = make_paired_state(model, linears=linears, aux_std=0.05)
    return paired | {k: torch.full((1,), 0.3) for k in paired if k.endswith(".cross_modal_scale")}


def _attached(seed: int = 0) -> nn.Module:
    model = _plain(seed)
    paired = _paired(model)
    pathway.attach(model, paired)
    model.load_state_dict(paired, strict=True)
    return model


def _lora(model: nn.Module, targets: list[str] = TARGETS) -> nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return hf_vit_arch.example_input(8, gen), torch.randint(0, hf_vit_arch.LABELS, (8,), generator=gen)


def _train(model: nn.Module, steps: int = 3) -> None:
    x, y = _data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(pixel_values=x).logits, y).backward()
        opt.step()
    model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=_data()[0]).logits


def _outputs(peft_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with the adapter, logits with the adapter disabled)."""
    with peft_model.disable_adapter():
        disabled = _logits(peft_model)
    return _logits(peft_model), disabled


# 1e-5: a merged linear computes x·(W + s·B·A) where LoRA computed x·W + s·(x·A)·B: float32 reassociation only
# (6e-7 measured on these logits, which are of order 1).
TOL = 1e-5


def test_merge_and_unload_folds_then_merges(tmp_path: Path) -> None:
    model = _lora(_attached())
    pathway_params = [p for pw in pathway.pathway_modules(model).values() for p in pw.parameters()]
    assert len(pathway.pathway_modules(model)) == 12 and not any(p.requires_grad for p in pathway_params)
    lambdas = pathway.scales(model)
    _train(model)
    assert pathway.scales(model) == lambdas  # PEFT froze λ; only LoRA trained
    with_adapter, disabled = _outputs(model)
    assert (with_adapter - disabled).abs().max() > 1e-2  # the adapter learned something

    merged = merge_and_unload(model)
    assert type(merged) is transformers.ViTForImageClassification and not pathway.is_attached(merged)
    assert list(merged.state_dict()) == list(_plain().state_dict())  # plain: no pathway or LoRA key left
    torch.testing.assert_close(_logits(merged), with_adapter, atol=TOL, rtol=0)
    assert (_logits(merged) - disabled).abs().max() > 1e-2

    # an ordinary HF model: save_pretrained / from_pretrained load it strictly and give the same logits
    merged.save_pretrained(tmp_path / "merged")
    reloaded, info = transformers.ViTForImageClassification.from_pretrained(
        tmp_path / "merged", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(reloaded.eval()), _logits(merged))


def test_peft_merge_alone_loses_the_adapter() -> None:
    """What docs/huggingface.md warns about: PEFT's merge edits `base_layer.weight.data`, a tensor the
    parametrization recomputes on every access, so the merged model is the adapter-disabled one, without error.
    (LoRA on pathway linears only here: a merge into a plain linear, like the head, is a real one.)"""
    model = _lora(_attached(), targets=["q_proj", "v_proj"])
    _train(model)
    with_adapter, disabled = _outputs(model)
    bare = model.merge_and_unload()
    assert torch.equal(_logits(bare), disabled)  # exactly: nothing of the adapter is left
    assert (_logits(bare) - with_adapter).abs().max() > 1e-2


def test_lambda_trained_alongside_lora() -> None:
    model = _lora(_attached())
    for pw in pathway.pathway_modules(model).values():
        pw.cross_modal_scale.requires_grad_(True)
    before = pathway.scales(model)
    _train(model)
    after = pathway.scales(model)
    assert all(abs(after[k] - before[k]) > 1e-3 for k in before)
    with_adapter, _ = _outputs(model)
    merged = merge_and_unload(model)  # folds the trained λ, then merges
    torch.testing.assert_close(_logits(merged), with_adapter, atol=TOL, rtol=0)


def test_adapter_merged_into_a_pathway_weight_is_refused() -> None:
    model = _lora(_attached())
    _train(model)
    with_adapter, _ = _outputs(model)
    model.merge_adapter()  # PEFT marks every adapter merged; the ones on pathway weights were lost
    with pytest.raises(FoldError, match=r"(?s)4 problem.*q_proj\.base_layer.*unmerge_adapter\(\)") as exc:
        merge_and_unload(model)
    assert "classifier" not in str(exc.value)  # a merge into a plain weight is a real one
    assert len(pathway.pathway_modules(model)) == 12  # nothing changed
    with pytest.raises(FoldError, match="unmerge_adapter"):
        pathway.fold(model)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(merge_and_unload(model)), with_adapter, atol=TOL, rtol=0)


def test_attach_after_get_peft_model() -> None:
    """Attach first, then wrap: attaching to linears LoRA already wraps is refused as a whole (a LoRA layer has no
    weight of its own), leaving the model untouched. Attaching only to linears LoRA does not wrap works, and
    merge_and_unload is exact there too."""
    plain = _plain()
    paired = _paired(plain)
    model = _lora(plain)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target in (model, model.base_model.model):  # PeftModel forwards the module paths to the model it wraps
        with pytest.raises(
            AttachError,
            match=r"(?s)4 problem.*q_proj': Linear has no `weight` Parameter: it wraps a base layer \(a PEFT adapter\?\); attach the pathway before get_peft_model",
        ):
            pathway.attach(target, paired)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)

    unwrapped = [k.removesuffix(".aux_weight") for k in paired if k.endswith(".aux_weight") and "q_proj" not in k]
    unwrapped = [k for k in unwrapped if "v_proj" not in k]
    pathway.attach(model, paired, layers=unwrapped, init_scale=0.3)  # through PeftModel's forwarding
    assert len(pathway.pathway_modules(model)) == 8
    _train(model)
    with_adapter, _ = _outputs(model)
    torch.testing.assert_close(_logits(merge_and_unload(model)), with_adapter, atol=TOL, rtol=0)


def test_merge_and_unload_needs_a_peft_model() -> None:
    model = _attached()
    assert not is_peft_model(model) and is_peft_model(_lora(_attached()))
    with pytest.raises(BadInputError, match="not a PEFT model"):
        merge_and_unload(model)
    assert pathway.is_attached(model)


def test_trainer_warns_when_lambda_trains_with_an_adapter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mmsurgery.integrations.trainer import PathwayTrainer

    model = _lora(_attached())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-3)
    frozen = PathwayTrainer(model=model, args=args, scale_lr_mult=10.0).create_optimizer()
    assert [g["name"] for g in frozen.param_groups] == ["decay"]  # LoRA's A and B only: λ is frozen
    for pw in pathway.pathway_modules(model).values():
        pw.cross_modal_scale.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="mmsurgery.integrations.trainer"):
        opt = PathwayTrainer(model=model, args=args, scale_lr_mult=10.0).create_optimizer()
    assert "hold the adapter only" in caplog.text
    group = next(g for g in opt.param_groups if g["name"] == "cross_modal_scale")
    assert len(group["params"]) == 12 and group["lr"] == pytest.approx(1e-2) and group["weight_decay"] == 0.0


@pytest.mark.slow
def test_importing_mmsurgery_imports_neither_transformers_nor_peft() -> None:
    code = (
        "import sys, mmsurgery, mmsurgery.pathway, mmsurgery.integrations, mmsurgery.integrations.peft\n"
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
