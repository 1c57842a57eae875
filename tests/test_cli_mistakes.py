"""Mistakes on the user's path get one helpful line (exit 2): a Hugging Face folder verified as the built-in ViT,
PLAIN and PAIRED given the wrong way round, and messages that list several problems or quote another library's
multi-line message, which must read as one line (never a literal backslash-n). The console script in a
subprocess, on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pathway_fixtures import tiny_pair, trained_like
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery.models.vit import ViTConfig

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
SCRIPT = Path(sys.executable).with_name("mmsurgery")


def mmsurgery(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, nothing on stdout, exactly one `error:` line on stderr, no traceback, no literal backslash-n."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert r.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "\\n" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A paired tiny ViT (λ 0.3, --heads 2) and its fold; a copy of it whose W_aux is NaN in two linears."""
    d = tmp_path_factory.mktemp("mistakes")
    trained_like(tiny_pair(d), d / "paired.safetensors", lam=0.3)
    with safe_open(d / "paired.safetensors", "pt") as f:
        meta = dict(f.metadata() or {})
    sd = load_file(d / "paired.safetensors")
    assert mmsurgery("fold", d / "paired.safetensors", "-o", d / "plain.safetensors").returncode == 0
    for k in ("blocks.0.attn.qkv.aux_weight", "blocks.1.mlp.fc1.aux_weight"):
        sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, d / "nan.safetensors", metadata=meta)
    return SimpleNamespace(
        dir=d, plain=d / "plain.safetensors", paired=d / "paired.safetensors", nan=d / "nan.safetensors"
    )


def _hf_folder(folder: Path, config: dict) -> Path:
    """A model folder as `save_pretrained` leaves it: Hugging Face key names and a config.json."""
    folder.mkdir()
    save_file({"vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(8, 8)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_swapped_plain_and_paired_say_so(files) -> None:
    line = one_error_line(mmsurgery("verify", files.paired, "--against", files.plain))
    assert line == (
        f"error: PLAIN and PAIRED look swapped: {files.paired} holds pathway tensors (e.g. "
        f"blocks.0.attn.proj.aux_weight) and {files.plain} holds none; give the folded checkpoint first: "
        f"mmsurgery verify {files.plain} --against {files.paired}"
    )
    r = mmsurgery("verify", files.plain, "--against", files.paired, "--stages", "weights,keys")  # the right way round
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stdout + r.stderr


def test_hf_folder_without_arch_hf_says_pass_arch_hf(tmp_path) -> None:
    folder = _hf_folder(tmp_path / "vit-hf", {"model_type": "vit", "hidden_size": 8})
    for given in (folder, folder / "model.safetensors"):
        line = one_error_line(mmsurgery("verify", given))
        assert line.startswith(f"error: {given}: not the built-in timm-named ViT (--arch vit, the default)")
        assert line.endswith("pass --arch hf to build it from its config.json")
    # the hint is for a folder with a config.json only: a bare file of other keys is still "not a timm-style ViT"
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(folder / "model.safetensors"), bare)
    line = one_error_line(mmsurgery("verify", bare))
    assert "not a timm-style ViT state dict" in line and "--arch hf" not in line


def test_several_attach_problems_read_as_one_line(files) -> None:
    """pathway.attach lists every problem it found: joined by "; " on the one error line."""
    line = one_error_line(mmsurgery("verify", files.plain, "--against", files.nan, "--stages", "keys,fold"))
    assert "cannot attach the pathway; the model was not changed (2 problem(s)): 'blocks.0.attn.qkv': " in line
    assert "aux_weight has non-finite values; 'blocks.1.mlp.fc1': aux_weight has non-finite values" in line


def test_another_librarys_multi_line_message_reads_as_one_line(tmp_path) -> None:
    """transformers' message for an unknown model_type spans paragraphs; the error line keeps all of it."""
    pytest.importorskip("transformers", reason="transformers is an optional extra (in the dev extra)")
    folder = _hf_folder(tmp_path / "unknown", {"model_type": "no-such-model"})
    line = one_error_line(mmsurgery("verify", folder, "--arch", "hf"))
    assert "transformers cannot read it (ValueError: " in line and "no-such-model" in line
