from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from examples_loader import load_example
from pathway_fixtures import make_paired_state, tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery.data.digits import load_digits_tensors
from mmsurgery.models.vit import METADATA_KEY
from mmsurgery.pathway import pathway_modules

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune.py"


def _example() -> ModuleType:
    return load_example("finetune")


def _paired_file(tmp_path: Path, num_classes: int) -> Path:
    model = tiny_vit(num_classes=num_classes)
    path = tmp_path / f"paired{num_classes}.safetensors"
    meta = {METADATA_KEY: json.dumps(model.config.to_dict()), "provenance": "unit test"}
    save_file(make_paired_state(model, aux_std=0.05), str(path), metadata=meta)
    return path


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_digits_splits_are_fixed_and_disjoint() -> None:
    a = load_digits_tensors(16, 3, split_seed=0)
    b = load_digits_tensors(16, 3, split_seed=0)
    assert [len(s) for s in a] == [1258, 180, 359]
    x, y = a.train.tensors
    assert x.shape == (1258, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0 and set(y.tolist()) == set(range(10))
    assert all(torch.equal(s.tensors[0], t.tensors[0]) for s, t in zip(a, b, strict=True))
    c = load_digits_tensors(16, 3, split_seed=1)
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])
    # A partition of the 1797 digits: the three splits together hold each class exactly as often as the data.
    counts = torch.bincount(torch.cat([s.tensors[1] for s in a]), minlength=10)
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert load_digits_tensors(20, 1).val.tensors[0].shape[1:] == (1, 20, 20)


def test_finetune_fresh_head_then_resume_frozen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = _example()
    paired = _paired_file(tmp_path, num_classes=0)  # no head: the example adds a 10-class one
    out = tmp_path / "trained.safetensors"
    common = ["--epochs", "1", "--batch-size", "64", "--train-limit", "256", "--lr", "3e-3"]
    assert example.main([str(paired), "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "val_acc" in printed and "test_acc" in printed
    before, after = load_file(str(paired)), load_file(str(out))
    assert set(after) == set(before) | {"head.weight", "head.bias"} and after["head.weight"].shape == (10, 32)
    lambdas = {k: v for k, v in after.items() if k.endswith("cross_modal_scale")}
    assert len(lambdas) == 8 and all(v.abs().item() > 0 for v in lambdas.values())
    assert not torch.equal(after["blocks.0.mlp.fc1.aux_weight"], before["blocks.0.mlp.fc1.aux_weight"])
    meta = _metadata(out)
    assert meta["provenance"] == "unit test" and json.loads(meta[METADATA_KEY])["num_classes"] == 10

    resumed = tmp_path / "resumed.safetensors"
    assert example.main([str(out), "--out", str(resumed), "--aux-frozen", *common]) == 0
    again = load_file(str(resumed))
    assert set(again) == set(after)
    aux_keys = [k for k in after if k.endswith("aux_weight")]
    assert all(torch.equal(again[k], after[k]) for k in aux_keys)  # frozen W_aux: bit-identical
    assert not all(torch.equal(again[k], after[k]) for k in lambdas)  # λ resumed and moved on
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


@pytest.mark.slow
def test_finetune_under_torchrun(tmp_path: Path) -> None:
    paired = _paired_file(tmp_path, num_classes=5)  # wrong-sized head: replaced
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           str(paired), "--out", str(out), "--epochs", "1", "--batch-size", "32", "--train-limit", "128"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1") == 1 and "2 process(es)" in proc.stdout  # only rank 0 prints
    trained = load_file(str(out))
    assert trained["head.weight"].shape == (10, 32)
    assert all(v.abs().item() > 0 for k, v in trained.items() if k.endswith("cross_modal_scale"))


@pytest.mark.slow
def test_finetune_a_hugging_face_paired_folder_then_fold_it(tmp_path: Path, minilm_path: Path) -> None:
    """The HF path end to end, as a user runs it: a `save_pretrained` ViTModel folder (no head) with its image
    processor -> `mmsurgery pair` -> `vit.paired/` -> the example trains a 10-class classifier and writes
    `trained/` -> `mmsurgery fold` -> `trained.plain/`, which `from_pretrained` loads strictly and which computes
    what the trained pathway model computed."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                                 intermediate_size=1536, image_size=16, patch_size=4)  # fmt: skip
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    script = Path(sys.executable).with_name("mmsurgery")

    def run(*args: object) -> None:
        r = subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]

    run("pair", tmp_path / "vit", minilm_path)
    assert (tmp_path / "vit.paired" / "preprocessor_config.json").is_file()
    example = _example()
    common = ["--epochs", "1", "--batch-size", "64", "--train-limit", "128", "--lr", "3e-3"]
    assert example.main([str(tmp_path / "vit.paired"), "--out", str(tmp_path / "trained"), *common]) == 0
    trained = load_file(str(tmp_path / "trained" / "model.safetensors"))
    lambdas = [v for k, v in trained.items() if k.endswith("cross_modal_scale")]
    assert len(lambdas) == 12 and all(v.abs().item() > 0 for v in lambdas)  # q k v o fc1 fc2 × 2 blocks
    assert "vit.encoder.layer.0.attention.attention.query.aux_weight" in trained
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["architectures"] is not None
    assert (tmp_path / "trained" / "preprocessor_config.json").is_file()

    run("fold", tmp_path / "trained")
    folded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "trained.plain")
    assert folded.config.num_labels == 10
    # The trained model, rebuilt the way the example builds it, against the folded one. Tolerance 1e-5: the folded
    # weights are W + λ·W_aux exactly (foldmath), so only the float32 matmul order can differ; the pathway's own
    # effect on the logits is far larger (asserted).
    model = example.build_hf_model(tmp_path / "trained", dict(trained), aux_frozen=False, log=lambda *_: None)
    x = load_digits_tensors(16, 3).test.tensors[0][:8]
    with torch.no_grad():
        want, got = model(x), folded(pixel_values=x).logits
        for pw in pathway_modules(model).values():
            pw.cross_modal_scale.zero_()
        without = model(x)
    assert (got - want).abs().max().item() <= 1e-5
    assert (without - want).abs().max().item() > 1e-4
