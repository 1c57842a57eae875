"""`mmsurgery.integrations.trainer`: transformers' Trainer on a tiny HF ViT with the pathway (CPU, a few steps)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pathway_fixtures import make_paired_state
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (in the dev extra)")

import hf_vit_arch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mmsurgery import pathway  # noqa: E402
from mmsurgery.errors import BadInputError  # noqa: E402
from mmsurgery.hf import to_disk_names, to_model_names  # noqa: E402
from mmsurgery.integrations.trainer import PathwayTrainer  # noqa: E402

SCRIPT = Path(sys.executable).with_name("mmsurgery")
N = 8


def _attached(seed: int = 0, scale: float = 0.0) -> nn.Module:
    """A tiny ViTForImageClassification with a pathway (random W_aux) on each of its 12 block linears, λ = `scale`."""
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(hf_vit_arch.config())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("vit.")]
    paired = make_paired_state(model, linears=linears, seed=seed + 1, aux_std=0.05)
    paired |= {k: torch.full((1,), scale) for k in paired if k.endswith(".cross_modal_scale")}
    pathway.attach(model, paired)
    model.load_state_dict(paired, strict=True)
    return model


class _Batch(torch.utils.data.Dataset):
    """N fixed examples: with `per_device_train_batch_size=N` every step sees all of them, in any order."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = hf_vit_arch.example_input(N, gen)
        self.y = torch.randint(0, hf_vit_arch.LABELS, (N,), generator=gen)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _args(out: Path, **overrides: object) -> transformers.TrainingArguments:
    options: dict[str, object] = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=N,
        learning_rate=1e-2,
        weight_decay=0.5,  # large, so that decaying λ would show
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: the reference loop below does none
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return transformers.TrainingArguments(**(options | overrides))


def _reference_lambdas(model: nn.Module, args, data: _Batch, *, scale_lr_mult: float, decay_scale: bool) -> dict:
    """λ after the same steps with a hand-built optimizer: Trainer's optimizer class and decay rule, λ with weight
    decay 0 and lr × `scale_lr_mult` (or, with `decay_scale`, λ treated as Trainer treats it by default)."""
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    scale_ids = {id(pw.cross_modal_scale) for pw in pathway.pathway_modules(model).values()}
    groups: list[dict] = [
        {"params": [], "weight_decay": args.weight_decay},
        {"params": [], "weight_decay": 0.0},
        {"params": [], "weight_decay": 0.0, "lr": args.learning_rate * scale_lr_mult},
    ]
    for name, p in model.named_parameters():
        if id(p) in scale_ids and not decay_scale:
            groups[2]["params"].append(p)
        else:
            groups[0 if name in decay_names else 1]["params"].append(p)
    opt = cls([g for g in groups if g["params"]], **kwargs)
    model.train()
    for _ in range(args.max_steps):
        opt.zero_grad()
        model(pixel_values=data.x, labels=data.y).loss.backward()
        opt.step()
    return pathway.scales(model)


@pytest.mark.slow
def test_lambda_has_no_weight_decay_and_its_own_lr(tmp_path: Path) -> None:
    model = _attached(scale=0.5)
    start = copy.deepcopy(model)
    data = _Batch()
    args = _args(tmp_path)
    trainer = PathwayTrainer(model=model, args=args, train_dataset=data, scale_lr_mult=10.0)
    trainer.train()

    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == ["decay", "no_decay", "cross_modal_scale"]
    lambdas = {id(pw.cross_modal_scale) for pw in pathway.pathway_modules(model).values()}
    aux = {id(pw.aux_weight) for pw in pathway.pathway_modules(model).values()}
    assert {id(p) for p in groups["cross_modal_scale"]["params"]} == lambdas and len(lambdas) == 12
    assert groups["cross_modal_scale"]["weight_decay"] == 0.0
    assert aux <= {id(p) for p in groups["decay"]["params"]} and groups["decay"]["weight_decay"] == 0.5
    # after the constant scheduler's steps, λ's lr is still 10× everyone else's
    assert groups["cross_modal_scale"]["lr"] == pytest.approx(10 * groups["decay"]["lr"]) == pytest.approx(0.1)
    ids = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad) and len(set(ids)) == len(ids)

    got = pathway.scales(model)
    assert all(abs(v - 0.5) > 1e-3 for v in got.values())  # λ moved
    want = _reference_lambdas(copy.deepcopy(start), args, data, scale_lr_mult=10.0, decay_scale=False)
    # 1e-6: the same float32 updates in the same order; only the reduction order inside kernels may differ.
    assert all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
    # ...and the test can tell: with Trainer's default groups (λ decayed, same lr) λ ends elsewhere
    plain = _reference_lambdas(copy.deepcopy(start), args, data, scale_lr_mult=1.0, decay_scale=True)
    assert max(abs(got[k] - plain[k]) for k in plain) > 0.05


def test_plain_trainer_would_decay_lambda() -> None:
    """Why the hook exists: Trainer's own decay rule puts every λ among the decayed parameters."""
    model = _attached()
    decayed = transformers.Trainer.get_decay_parameter_names(None, model)
    assert sum(n.endswith(".cross_modal_scale") for n in decayed) == 12


def test_optimizer_that_groups_itself_is_refused(tmp_path: Path) -> None:
    def factory():  # Trainer's "optimizer factory" protocol (Muon, Dion): it gets the model and groups it itself
        return lambda model, **kw: torch.optim.SGD(model.parameters(), lr=0.1)

    trainer = PathwayTrainer(
        model=_attached(), args=_args(tmp_path), train_dataset=_Batch(), optimizer_cls_and_kwargs=(factory, {})
    )
    with pytest.raises(BadInputError, match="chooses its own parameter groups"):
        trainer.create_optimizer()
    with pytest.raises(BadInputError, match="positive"):
        PathwayTrainer(model=_attached(), args=_args(tmp_path), scale_lr_mult=0.0)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.slow
def test_checkpoint_holds_the_pathway_and_folds_to_the_trained_model(tmp_path: Path) -> None:
    model = _attached()
    data = _Batch()
    before = _logits(copy.deepcopy(model), data.x)
    PathwayTrainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=3), train_dataset=data).train()
    trained = _logits(model, data.x)
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "model.safetensors").is_file()

    # the checkpoint keeps on-disk names with the paired keys, and `mmsurgery inspect` reads λ per layer from it
    on_disk = to_disk_names(model, list(pathway.scales(model)))
    r = subprocess.run([SCRIPT, "inspect", "--json", ckpt], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    layers = {d["layer"]: d["scale"] for d in json.loads(r.stdout)["pathway"]["layers"]}
    assert layers == pytest.approx({on_disk[k]: v for k, v in pathway.scales(model).items()}, abs=0)
    assert all(v != 0.0 for v in layers.values())

    # `from_pretrained` on it silently drops the pathway: W alone, the aux/λ keys reported unexpected (the docs say so)
    reloaded, info = type(model).from_pretrained(ckpt, output_loading_info=True)
    assert len(info["unexpected_keys"]) == 24 and not info["missing_keys"]
    assert (_logits(reloaded, data.x) - trained).abs().max() > 1e-3

    # the way out: `mmsurgery fold checkpoint-N -o x.safetensors`, loaded strictly into a plain model
    out = tmp_path / "plain.safetensors"
    r = subprocess.run([SCRIPT, "fold", ckpt, "-o", out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plain = transformers.ViTForImageClassification(hf_vit_arch.config())
    plain.load_state_dict(to_model_names(plain, load_file(out)), strict=True)
    folded = _logits(plain, data.x)
    # 1e-6: fold computes W + λ·W_aux with the forward's float32 expression, so the weights are identical; the
    # plain model's attention kernels may still order their reductions differently from the trained one's.
    torch.testing.assert_close(folded, trained, atol=1e-6, rtol=0)
    assert (folded - before).abs().max() > 1e-2  # training changed the model, so the match above is not vacuous


@pytest.mark.slow
def test_resume_loads_the_attached_model_strictly(tmp_path: Path) -> None:
    """transformers 5's resume loads with strict=False under the on-disk names, restoring no renamed weight and no
    λ; PathwayTrainer restores every tensor. Three steps, saved; then a fresh model resumed from checkpoint-3."""
    data = _Batch()
    model = _attached()
    args = _args(tmp_path, save_strategy="steps", save_steps=3)
    PathwayTrainer(model=model, args=args, train_dataset=data).train()
    fresh = _attached(seed=5)
    assert pathway.scales(fresh) != pathway.scales(model)
    PathwayTrainer(model=fresh, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3")
    )
    got, want = fresh.state_dict(), model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)

    # load_best_model_at_end: "best" is the highest eval loss, so step 3 of 6, which is not the final state
    best_args = _args(
        tmp_path / "best", max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
    )  # fmt: skip
    best = _attached()
    trainer = PathwayTrainer(model=best, args=best_args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    got = best.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # checkpoint-3 of this run is the same as of the first

    wrong = transformers.ViTForImageClassification(hf_vit_arch.config())  # no pathway: Trainer's own loading
    other = tmp_path / "other"
    PathwayTrainer(model=wrong, args=_args(other, save_strategy="steps", save_steps=3), train_dataset=data).train()
    mismatched = _attached()
    with pytest.raises(BadInputError, match=r"24 missing"):
        PathwayTrainer(model=mismatched, args=args, train_dataset=data).train(
            resume_from_checkpoint=str(other / "checkpoint-3")
        )


@pytest.mark.slow
def test_hf_trainer_example_runs(tmp_path: Path, minilm_path: Path) -> None:
    """examples/hf_trainer.py end to end, shortened to 4 steps: pair with MiniLM, PathwayTrainer, a checkpoint
    with the pathway, fold, and a plain folder that from_pretrained loads with the trained logits (exit 0)."""
    example = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
    cmd = [sys.executable, example, "--out", tmp_path, "--aux", minilm_path, "--max-steps", "4", "--batch-size", "16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "12 of 12 linears paired" in r.stdout and "from_pretrained gives the trained logits" in r.stdout
    ckpt = tmp_path / "run" / "checkpoint-4" / "model.safetensors"
    assert sum(k.endswith(".cross_modal_scale") for k in load_file(ckpt)) == 12
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert not any(k.endswith((".aux_weight", ".cross_modal_scale")) for k in plain)


def test_resume_of_a_tied_model(tmp_path: Path) -> None:
    """GPT-2 ties lm_head to the embeddings and save_pretrained writes the pair once: the strict resume accepts the
    missing twin, restores every tensor (pathways on Conv1D included) and keeps the tie."""

    def gpt2(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))
        linears = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        paired = make_paired_state(model, linears=linears, seed=seed + 1, aux_std=0.05)
        pathway.attach(model, paired)
        model.load_state_dict(paired, strict=True)
        return model

    ids = torch.randint(0, 50, (N, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = _args(tmp_path, save_strategy="steps", save_steps=3)
    model = gpt2(0)
    PathwayTrainer(model=model, args=args, train_dataset=data).train()
    assert "lm_head.weight" not in load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    fresh = gpt2(5)
    PathwayTrainer(model=fresh, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3")
    )
    got, want = fresh.state_dict(), model.state_dict()
    assert len(pathway.scales(fresh)) == 8 and all(torch.equal(got[k], want[k]) for k in want)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
