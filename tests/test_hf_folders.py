"""Issue 12, items 1-2: Hugging Face model folders in and out.

A tiny `save_pretrained` ViT folder (width 384, so every block linear pairs with the real MiniLM) goes through
the `mmsurgery` console script: `pair` writes a model folder, transformers' own `from_pretrained` + `Trainer`
train it with the pathway attached (names on disk converted by `attach`), the Trainer's `checkpoint-N` folds
into a model folder that `from_pretrained` loads as is, and its logits are the trained model's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery import hf, pathway
from mmsurgery.checkpoint import open_checkpoint, write_safetensors
from mmsurgery.checkpoint.writer import TEMP_SUFFIX, SafetensorsWriter
from mmsurgery.errors import AttachError, OutputExistsError
from mmsurgery.fold import fold_file
from mmsurgery.pairing import pair

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")

SCRIPT = Path(sys.executable).with_name("mmsurgery")
IMAGE, LABELS = 16, 5
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")
# float32 weights are asserted bit-identical first; outputs may still differ by kernel choice on differently
# aligned buffers (oneDNN), far below 1e-5, while the pathway moves them by more than 1e-3.
ATOL = 1e-5


def vit_config(**kw: object) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=IMAGE,
        patch_size=4,
        **kw,
    )


def image_processor() -> object:
    return transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE})


def pixels(n: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


def mmsurgery(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script, as a user runs it (relative paths from `cwd`)."""
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=240, check=False
    )


def loads_strictly(folder: Path, cls: type = transformers.ViTForImageClassification) -> torch.nn.Module:
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"pixel_values": pixels(1, seed=100 + i)[0], "labels": i % LABELS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_path) -> dict[str, object]:
    """`vit/` (save_pretrained + preprocessor) -> `mmsurgery pair` -> `vit.paired/` -> from_pretrained, attach,
    Trainer (2 steps, checkpoint at 2) -> `run/checkpoint-2/` -> `mmsurgery fold` -> `run/checkpoint-2.plain/`."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.ViTForImageClassification(vit_config(num_labels=LABELS)).save_pretrained(root / "vit")
    image_processor().save_pretrained(root / "vit")
    paired_run = mmsurgery("pair", "vit", minilm_path, cwd=root)
    assert paired_run.returncode == 0, paired_run.stderr

    model = transformers.ViTForImageClassification.from_pretrained(root / "vit.paired")
    pathway.attach(model, root / "vit.paired")  # the folder's names on disk, the model's in memory
    args = transformers.TrainingArguments(
        output_dir=str(root / "run"),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Images(), processing_class=image_processor())
    trainer.train()
    folded_run = mmsurgery("fold", "run/checkpoint-2", cwd=root)
    assert folded_run.returncode == 0, folded_run.stderr
    return {"root": root, "model": model.eval(), "pair": paired_run, "fold": folded_run}


@pytest.mark.slow
def test_pair_writes_a_model_folder_beside_the_input(trained) -> None:
    root: Path = trained["root"]
    assert "wrote vit.paired/ (model.safetensors, config.json, preprocessor_config.json)" in trained["pair"].stdout
    out = root / "vit.paired"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    for name in ("config.json", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (root / "vit" / name).read_bytes()
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "pt" and meta["mmsurgery.format"] == "paired/1" and "mmsurgery.plan" in meta
    assert "vit.encoder.layer.0.attention.attention.query.aux_weight" in keys  # on-disk names, as save_pretrained
    assert sorted((root / "vit").iterdir()) == [
        root / "vit" / n for n in ("config.json", "model.safetensors", "preprocessor_config.json")
    ]
    model = transformers.ViTForImageClassification.from_pretrained(out)
    pathway.attach(model, out)  # λ = 0: exactly the target model
    x = pixels()
    assert len(pathway.scales(model)) == 12
    assert torch.equal(logits(model, x), logits(loads_strictly(root / "vit"), x))


@pytest.mark.slow
def test_trainer_checkpoint_folds_into_a_folder_with_the_trained_logits(trained) -> None:
    root: Path = trained["root"]
    model = trained["model"]
    ckpt, plain = root / "run" / "checkpoint-2", root / "run" / "checkpoint-2.plain"
    assert "wrote run/checkpoint-2.plain" in trained["fold"].stdout
    assert all((ckpt / name).is_file() for name in TRAINING_STATE)  # a real Trainer checkpoint ...
    assert sorted(p.name for p in plain.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (plain / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()  # ... without its state

    with safe_open(plain / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["mmsurgery.format"] == "folded/1"
    assert set(json.loads(meta["mmsurgery.scales"])) == {
        f"vit.encoder.layer.{i}.{m}" for i in range(2) for m in pathway_modules_on_disk()
    }

    folded = loads_strictly(plain)
    attached = dict(model.named_modules())
    for name, module in folded.named_modules():
        if name in pathway.pathway_modules(model):
            assert torch.equal(module.weight, attached[name].weight)  # W + λ·W_aux, bit for bit
    x = pixels()
    expected = logits(model, x)
    assert torch.allclose(logits(folded, x), expected, atol=ATOL, rtol=0)
    untouched = loads_strictly(root / "vit")
    assert (logits(untouched, x) - expected).abs().max() > 1e-3
    saved = pathway.scales(model)
    assert all(v != 0 for v in saved.values())
    for pw in pathway.pathway_modules(model).values():  # the trained weights without the pathway: not the fold
        pw.cross_modal_scale.data.zero_()
    try:
        assert (logits(model, x) - expected).abs().max() > 1e-4
    finally:
        for n, pw in pathway.pathway_modules(model).items():
            pw.cross_modal_scale.data.fill_(saved[n])


def pathway_modules_on_disk() -> list[str]:
    q = "attention.attention"
    return [f"{q}.query", f"{q}.key", f"{q}.value", "attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.mark.slow
def test_resume_a_trainer_checkpoint_into_a_fresh_model(trained) -> None:
    """The documented resume: from_pretrained, attach, then a strict load of the file in the model's names."""
    root: Path = trained["root"]
    ckpt = root / "run" / "checkpoint-2"
    model = transformers.ViTForImageClassification.from_pretrained(ckpt)
    paired = open_checkpoint(ckpt).to_state_dict()
    pathway.attach(model, paired)
    model.load_state_dict(hf.to_model_names(model, paired), strict=True)
    assert pathway.scales(model) == pytest.approx(pathway.scales(trained["model"]), abs=0)
    x = pixels()
    assert torch.equal(logits(model, x), logits(trained["model"], x))


@pytest.mark.slow
def test_save_pretrained_of_an_attached_model_is_a_paired_folder(trained, tmp_path, cli) -> None:
    """transformers' own revert gives the pathway keys on-disk names; a sharded fold of it loads too."""
    model = trained["model"]
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"vit.encoder.layer.1.output.dense.aux_weight", "vit.encoder.layer.1.output.dense.cross_modal_scale"} <= keys
    assert not any("q_proj" in k or "parametrizations" in k for k in keys)
    r = cli("fold", tmp_path / "saved", "-o", f"{tmp_path / 'sharded'}/", "--shard-size", "4MB")
    assert r.code == 0, r.err
    shards = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in shards and sum(n.startswith("model-0") for n in shards) > 1
    assert "config.json" in shards and "model.safetensors" not in shards
    folded = loads_strictly(tmp_path / "sharded")
    x = pixels()
    assert torch.allclose(logits(folded, x), logits(model, x), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_in_memory_names_still_attach_and_fold(trained, tmp_path, cli) -> None:
    """A hand-saved `model.state_dict()` (the model's names, `vit.layers.0.attention.q_proj`) attaches, resumes
    and folds; its fold is a bare file in those names that loads strictly into the model."""
    model = trained["model"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "mem.safetensors")
    fresh = transformers.ViTForImageClassification(vit_config(num_labels=LABELS))
    state = load_file(tmp_path / "mem.safetensors")
    assert "vit.layers.0.attention.q_proj.aux_weight" in state
    pathway.attach(fresh, tmp_path / "mem.safetensors")
    fresh.load_state_dict(hf.to_model_names(fresh, state), strict=True)
    x = pixels()
    assert torch.equal(logits(fresh, x), logits(model, x))
    r = cli("fold", tmp_path / "mem.safetensors")
    assert r.code == 0, r.err
    plain = transformers.ViTForImageClassification(vit_config(num_labels=LABELS))
    plain.load_state_dict(load_file(tmp_path / "mem.plain.safetensors"), strict=True)
    assert torch.allclose(logits(plain, x), logits(model, x), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_named_file_output_stays_one_bare_file_and_outputs_are_never_replaced(trained, tmp_path, cli) -> None:
    root: Path = trained["root"]
    r = cli("fold", root / "run" / "checkpoint-2", "-o", tmp_path / "one.safetensors")
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors"]
    with safe_open(tmp_path / "one.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
    again = cli("fold", root / "run" / "checkpoint-2")
    assert again.code == 2 and "checkpoint-2.plain" in again.err and "--force" in again.err
    assert len(again.err.strip().splitlines()) == 1


def test_vitmodel_folder_attaches_to_a_classifier_built_from_it(tmp_path, minilm_path) -> None:
    """A `ViTModel` folder (keys without the `vit.` prefix, as google/vit-base-patch16-224-in21k) paired, then
    `ViTForImageClassification.from_pretrained` of the paired folder: attach follows transformers' prefix rule."""
    torch.manual_seed(0)
    transformers.ViTModel(vit_config(), add_pooling_layer=False).save_pretrained(tmp_path / "base")
    res = pair(tmp_path / "base", minilm_path)
    assert res.output == tmp_path / "base.paired"
    with safe_open(res.output / "model.safetensors", "pt") as f:
        assert "encoder.layer.0.attention.attention.query.aux_weight" in set(f.keys())
    model = transformers.ViTForImageClassification.from_pretrained(res.output, num_labels=LABELS)
    pathway.attach(model, res.output, init_scale=0.5)
    assert sorted(pathway.scales(model))[:2] == ["vit.layers.0.attention.k_proj", "vit.layers.0.attention.o_proj"]
    model.save_pretrained(tmp_path / "cls")
    folded = fold_file(tmp_path / "cls")
    assert folded.output == tmp_path / "cls.plain" and len(folded.scales) == 12
    x = pixels()
    assert torch.allclose(logits(loads_strictly(folded.output), x), logits(model, x), atol=ATOL, rtol=0)


def test_attach_refuses_names_of_another_model(tmp_path) -> None:
    model = transformers.ViTForImageClassification(vit_config(num_labels=LABELS))
    bogus = {"vit.encoder.layer.9.attention.attention.query.aux_weight": torch.zeros(384, 384)}
    bogus["vit.encoder.layer.9.attention.attention.query.cross_modal_scale"] = torch.zeros(1)
    with pytest.raises(AttachError, match=r"'vit\.layers\.9\.attention\.q_proj': no such module"):
        pathway.attach(model, bogus)
    assert not pathway.is_attached(model)


@pytest.mark.slow
def test_bert_folder_keeps_its_tokenizer(tmp_path, minilm_path, cli) -> None:
    """A BERT classifier folder with a real tokenizer (MiniLM's, saved by transformers): paired with MiniLM,
    λ set, saved, folded; the plain folder loads its model and its tokenizer with `from_pretrained`."""
    cfg = transformers.BertConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536, vocab_size=512
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    transformers.AutoTokenizer.from_pretrained(minilm_path.parent).save_pretrained(tmp_path / "bert")
    tokenizer_files = sorted(p.name for p in (tmp_path / "bert").iterdir() if p.name.startswith("tokenizer"))
    assert tokenizer_files
    r = cli("pair", tmp_path / "bert", minilm_path)
    assert r.code == 0, r.err
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert.paired")
    pathway.attach(model, tmp_path / "bert.paired", init_scale=0.05)
    model.save_pretrained(tmp_path / "tuned")
    shutil.copy(tmp_path / "bert" / "tokenizer.json", tmp_path / "tuned")  # as a Trainer with a tokenizer does
    shutil.copy(tmp_path / "bert" / "tokenizer_config.json", tmp_path / "tuned")
    assert cli("fold", tmp_path / "tuned").code == 0
    plain = tmp_path / "tuned.plain"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in plain.iterdir()
    }
    folded = loads_strictly(plain, transformers.BertForSequenceClassification)
    ids = torch.tensor([[1, 5, 9, 300, 2], [1, 7, 7, 42, 2]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        untouched = loads_strictly(tmp_path / "bert", transformers.BertForSequenceClassification)(input_ids=ids).logits
        assert torch.allclose(folded(input_ids=ids).logits, expected, atol=ATOL, rtol=0)
    assert (untouched - expected).abs().max() > 1e-3
    tok = transformers.AutoTokenizer.from_pretrained(plain)
    assert tok("a b")["input_ids"][0] == tok.cls_token_id


def test_model_folder_carries_config_and_processors_not_weights_or_training_state(tmp_path) -> None:
    d = tmp_path / "checkpoint-500"
    d.mkdir()
    carried = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json", "vocab.txt"]
    skipped = [*TRAINING_STATE, "rng_state_3.pth", "scaler.pt", "model.safetensors", "model.safetensors.index.json"]
    skipped += ["model-00001-of-00002.safetensors", "pytorch_model.bin", "adapter_config.json", ".gitattributes"]
    for name in carried + skipped:
        (d / name).write_text("{}")
    (d / "global_step500").mkdir()  # DeepSpeed state: folders are never carried
    folder = hf.model_folder(d)
    assert folder is not None and folder.carried == tuple(carried)  # config.json first, then by name
    assert folder.sibling(".plain", replaces=".paired") == tmp_path / "checkpoint-500.plain"
    assert hf.model_folder(d / "model.safetensors") is None  # a file named directly is just that file
    (d / "config.json").unlink()
    assert hf.model_folder(d) is None


def test_writer_publishes_extra_files_with_a_new_folder_or_not_at_all(tmp_path) -> None:
    src = tmp_path / "config.json"
    src.write_text('{"model_type": "vit"}')
    t = {"a": torch.ones(4), "b": torch.zeros(4)}
    with (
        pytest.raises(RuntimeError, match="boom"),
        SafetensorsWriter(tmp_path / "out", [], extra_files={"config.json": src}),
    ):
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no folder, no temps
    res = write_safetensors(tmp_path / "out", t, extra_files={"config.json": src}, shard_size=16)
    assert res.extra_files == (tmp_path / "out" / "config.json",)
    assert (tmp_path / "out" / "config.json").read_text() == src.read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    with pytest.raises(ValueError, match="folder output"):
        write_safetensors(tmp_path / "x.safetensors", t, extra_files={"config.json": src})


def test_writer_into_an_existing_folder_replaces_the_other_layout_only_with_force(tmp_path) -> None:
    src = tmp_path / "config.json"
    src.write_text("{}")
    out = tmp_path / "out"
    write_safetensors(out, {"a": torch.ones(4)}, extra_files={"config.json": src})
    t = {"a": torch.full((4,), 2.0), "b": torch.zeros(4)}
    with pytest.raises(OutputExistsError, match=r"config\.json exists"):
        write_safetensors(out, t, shard_size=16, extra_files={"config.json": src})
    with pytest.raises(OutputExistsError, match=r"model\.safetensors exists \(a model in the other layout"):
        write_safetensors(out, t, shard_size=16)
    src.write_text('{"new": 1}')
    write_safetensors(out, t, shard_size=16, force=True, extra_files={"config.json": src})
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and not any(n.endswith(TEMP_SUFFIX) for n in names)
    assert (out / "config.json").read_text() == '{"new": 1}'
    with open_checkpoint(out) as ck:
        assert torch.equal(ck.get("a"), torch.full((4,), 2.0))
    write_safetensors(out, {"a": torch.ones(4)}, force=True, extra_files={"config.json": src})  # and back
    assert not (out / "model.safetensors.index.json").exists()  # retired first: it would shadow the new file
    with open_checkpoint(out) as ck:
        assert ck.format == "safetensors" and torch.equal(ck.get("a"), torch.ones(4))


# A single-file writer with a carried file into an existing folder, killed between linking the carried file and
# its commit point (the weights file); argv: out folder, source config.
KILLED_AT_COMMIT = """
import os, signal, sys, torch
import mmsurgery.checkpoint.publish as pub
import mmsurgery.checkpoint.writer as wr
real = pub.link
def link(src, dst, force):
    if dst.name == "model.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, force)
pub.link = link
wr.write_safetensors(sys.argv[1], {"a": torch.zeros(4)}, extra_files={"config.json": sys.argv[2]})
"""


def test_a_killed_writer_leaves_carried_files_that_the_next_writer_removes(tmp_path) -> None:
    src = tmp_path / "config.json"
    src.write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_COMMIT, str(out), str(src)], timeout=120, check=False)
    assert proc.returncode == -9
    assert (out / "config.json").exists() and not (out / "model.safetensors").exists()  # linked, not committed
    res = write_safetensors(out, {"a": torch.ones(4)}, extra_files={"config.json": src})  # no --force needed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert res.extra_files == (out / "config.json",)
