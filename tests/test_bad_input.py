"""Bad input on the user's path is refused fast, in one line, with exit 2 (issue 22): an already-paired input to
`pair`; a FIFO, socket or device where a file is read; `mmsurgery.format` versions that are not ASCII digits of
bounded length, through inspect, fold and verify alike; `mmsurgery.vit` metadata nested too deeply or holding a
huge number; a header of a million tensors; an integer weight to fold; a duplicated key in a shard index; and an
output inside an input's folder, with or without `--force`, through symlinks too. Each is the console script in a
subprocess on real files, with a timeout: a hang fails the test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pathway_fixtures import tiny_pair, tiny_vit, trained_like
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsurgery.checkpoint import safetensors_header
from mmsurgery.checkpoint.writer import write_safetensors
from mmsurgery.errors import BadInputError

SCRIPT = Path(sys.executable).with_name("mmsurgery")
FIFO = "a FIFO (named pipe), not a regular file"


def mmsurgery(*args: object, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The console script; a run past `timeout` (a hang on a FIFO) raises `TimeoutExpired` and fails the test."""
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def refused(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one `error:` line naming each of `needles`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def remeta(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of safetensors file `src` with metadata entries set (keys use `__` for `.`)."""
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    meta |= {k.replace("__", "."): v for k, v in changes.items()}
    save_file(state, dst, metadata=meta)
    return dst


def tree(folder: Path) -> dict[str, int]:
    """Every file under `folder` and its inode: equal before and after means nothing was written or replaced."""
    return {str(p.relative_to(folder)): p.stat().st_ino for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny timm ViT target and auxiliary; their paired file (λ 0.25) and its fold; the paired file as a sharded
    folder and as a Hugging Face model folder; a plain sharded target."""
    d = tmp_path_factory.mktemp("bad_input")
    paired = tiny_pair(d, target="t.safetensors", aux="a.safetensors", paired="p0.safetensors")
    trained_like(paired, d / "p.safetensors", lam=0.25)
    with safe_open(d / "p.safetensors", "pt") as f:
        meta = dict(f.metadata() or {})
    state = load_file(d / "p.safetensors")
    assert mmsurgery("fold", d / "p.safetensors", "-o", d / "plain.safetensors", "-q").returncode == 0
    write_safetensors(d / "sh", [*state.items()], metadata=meta, shard_size="40KB")
    (d / "hf").mkdir()
    shutil.copy(d / "p.safetensors", d / "hf" / "model.safetensors")
    (d / "hf" / "config.json").write_text('{"model_type": "vit"}')
    write_safetensors(d / "tsh", [*tiny_vit(0).state_dict().items()], shard_size="40KB")
    return SimpleNamespace(
        dir=d,
        t=d / "t.safetensors",
        a=d / "a.safetensors",
        p=d / "p.safetensors",
        plain=d / "plain.safetensors",
        sh=d / "sh",
        hf=d / "hf",
        tsh=d / "tsh",
        meta=meta,
        state=state,
    )


# --- item 3: pair takes plain models --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "role"),
    [(("p", "a"), "TARGET"), (("t", "p"), "AUX"), (("t", "a", "p"), "auxiliary model 2")],
    ids=["paired-target", "paired-aux", "paired-second-aux"],
)
def test_pair_refuses_an_already_paired_input_naming_it(ws, tmp_path: Path, inputs, role: str) -> None:
    out = tmp_path / "out.safetensors"
    args = [getattr(ws, name) for name in inputs]
    line = refused(mmsurgery("pair", *args, "-o", out), f"{ws.p}: {role} is already paired", "aux_weight")
    assert "fold it first" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    refused(mmsurgery("pair", *args, "--dry-run"), f"{ws.p}: {role} is already paired")  # before any plan


def test_pair_refuses_an_aux_that_only_its_metadata_marks_paired(ws, tmp_path: Path) -> None:
    marked = remeta(ws.a, tmp_path / "marked.safetensors", mmsurgery__format="paired/1")
    refused(mmsurgery("pair", ws.t, marked, "--dry-run"), f"{marked}: AUX is already paired", "'paired/1'")


def test_pair_refuses_the_target_as_its_own_auxiliary(ws, tmp_path: Path) -> None:
    """`pair t t`, also through a symlink: a model paired with itself would get W + λ·W."""
    link = tmp_path / "same.safetensors"
    link.symlink_to(ws.t)
    for aux in (ws.t, link):
        out = tmp_path / "out.safetensors"
        refused(mmsurgery("pair", ws.t, aux, "-o", out), f"{aux}: AUX is the target itself")
        assert not out.exists()
    copy = tmp_path / "copy.safetensors"  # another file with the same bytes is another model file: pairs
    copy.write_bytes(Path(ws.t).read_bytes())
    assert mmsurgery("pair", ws.t, ws.a, copy, "--dry-run").returncode == 0


def test_pair_takes_a_folded_checkpoint_as_an_auxiliary(ws, tmp_path: Path) -> None:
    """A folded file (folded/1, no pathway tensors) is a plain model: pairing with it is fine."""
    r = mmsurgery("pair", ws.t, ws.plain, "-o", tmp_path / "ok.safetensors", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok.safetensors").is_file()


# --- item 5: a non-regular file is refused before it is opened --------------------------------------------------


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("inspect", "w.pt"),
        ("inspect", "w.bin"),
        ("inspect", "weights"),
        ("inspect", "w.safetensors"),
        ("fold", "w.pt"),
        ("fold", "weights"),
        ("pair-target", "w.bin"),
        ("pair-aux", "weights"),
    ],
)
def test_a_fifo_named_as_a_checkpoint_is_refused_at_once(ws, tmp_path: Path, command: str, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    args = {
        "inspect": ("inspect", fifo),
        "fold": ("fold", fifo, "-o", tmp_path / "o.safetensors"),
        "pair-target": ("pair", fifo, ws.a, "--dry-run"),
        "pair-aux": ("pair", ws.t, fifo, "--dry-run"),
    }[command]
    started = time.monotonic()
    refused(mmsurgery(*args, timeout=30), f"{fifo}: {FIFO}")
    assert time.monotonic() - started < 30


def test_a_socket_is_refused_naming_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        refused(mmsurgery("inspect", path, timeout=30), f"{path}: a socket, not a regular file")


def _fifo_in_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).unlink()
    os.mkfifo(dst / name)
    return dst / name


@pytest.mark.parametrize("which", ["shard", "index"])
def test_a_fifo_in_a_sharded_folder_is_named_not_called_missing(ws, tmp_path: Path, which: str) -> None:
    shards = sorted(ws.sh.glob("model-*.safetensors"))
    assert len(shards) > 2
    name = shards[1].name if which == "shard" else "model.safetensors.index.json"
    fifo = _fifo_in_copy(ws.sh, tmp_path / "sh", name)
    line = refused(mmsurgery("inspect", tmp_path / "sh", timeout=30), f"{fifo}: {FIFO}")
    assert "missing" not in line


def test_a_fifo_model_file_in_a_folder_is_named_not_passed_over(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "model.safetensors")
    refused(mmsurgery("inspect", tmp_path / "m", timeout=30), f"{tmp_path / 'm' / 'model.safetensors'}: {FIFO}")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_fifo_in_a_model_folder_is_refused_not_silently_left_out(ws, tmp_path: Path, name: str) -> None:
    """Before, a FIFO config.json made the folder no model folder (a bare file out, no config) and a FIFO
    tokenizer.json was left out of the output folder."""
    folder = tmp_path / "hf"
    shutil.copytree(ws.hf, folder)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    refused(mmsurgery("fold", folder, timeout=30), f"{folder / name}: {FIFO}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written


def test_a_fifo_config_json_beside_a_target_file_is_refused(ws, tmp_path: Path) -> None:
    """`pair` reads a config.json beside the target for its head count: a FIFO there must not block it."""
    shutil.copy(ws.t, tmp_path / "model.safetensors")
    os.mkfifo(tmp_path / "config.json")
    r = mmsurgery("pair", tmp_path / "model.safetensors", ws.a, "-o", tmp_path / "o.safetensors", timeout=30)
    refused(r, f"{tmp_path / 'config.json'}: {FIFO}")


def test_a_fifo_map_file_is_refused(ws, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "map.json")
    r = mmsurgery("pair", ws.t, ws.a, "--map", tmp_path / "map.json", "--dry-run", timeout=30)
    refused(r, f"--map {tmp_path / 'map.json'}: {FIFO}")


def _dcp_folder(ws, folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming ... a single process"
        dcp.save(ws.state, checkpoint_id=folder, no_dist=True)
    return folder


@pytest.mark.parametrize("which", [".metadata", "distcp"])
def test_a_fifo_in_a_dcp_folder_is_named_not_called_missing(ws, tmp_path: Path, which: str) -> None:
    folder = _dcp_folder(ws, tmp_path / "ckpt")
    name = which if which == ".metadata" else next(p.name for p in folder.glob("*.distcp"))
    (folder / name).unlink()
    os.mkfifo(folder / name)
    line = refused(mmsurgery("inspect", folder, timeout=30), f"{folder / name}: {FIFO}")
    assert "missing" not in line and "without" not in line


# --- item 6: mmsurgery.format is KIND/N with N of 1 to 9 ASCII digits, for every command --------------------------

BAD_FORMATS = {
    "5000-digit": ("folded/" + "9" * 5000, "not KIND/N"),
    "full-width-digit": ("paired/\uff11", "not KIND/N"),
    "negative": ("paired/-1", "not KIND/N"),
    "newer-folded": ("folded/2", "upgrade mmsurgery"),
}


def _each_command(ws, tmp_path: Path, file: Path) -> list[subprocess.CompletedProcess[str]]:
    return [
        mmsurgery("inspect", file),
        mmsurgery("fold", file, "-o", tmp_path / "o.safetensors"),
        mmsurgery("verify", file, "--against", ws.p, "--stages", "weights"),
    ]


@pytest.mark.parametrize("case", list(BAD_FORMATS))
def test_a_bad_format_version_is_refused_alike_by_inspect_fold_and_verify(ws, tmp_path: Path, case: str) -> None:
    value, why = BAD_FORMATS[case]
    file = remeta(ws.plain, tmp_path / "x.safetensors", mmsurgery__format=value)
    lines = [refused(r, f"{file}: mmsurgery.format is", why) for r in _each_command(ws, tmp_path, file)]
    assert all(len(line) < 400 for line in lines), lines  # a 5,000-digit value is not repeated whole
    assert not (tmp_path / "o.safetensors").exists()


def test_a_current_format_passes_inspect_fold_and_verify(ws, tmp_path: Path) -> None:
    """The same three commands on the same file with `folded/1`: the refusals above are the version's doing."""
    file = remeta(ws.plain, tmp_path / "x.safetensors", mmsurgery__format="folded/1")
    inspect, fold, verify = _each_command(ws, tmp_path, file)
    assert inspect.returncode == 0, inspect.stderr
    assert fold.returncode == 0 and "already plain" in fold.stdout, fold.stderr
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize(("value", "code"), [("paired/01", 2), ("paired/0", 2), ("paired/3", 2), ("merged/1", 0)])
def test_format_values_read_as_documented(ws, tmp_path: Path, value: str, code: int) -> None:
    """A leading zero or version 0 is malformed; a newer version of a known kind is refused; an unknown kind is read
    by its tensor names (docs/formats.md, "Versions")."""
    file = remeta(ws.p, tmp_path / "x.safetensors", mmsurgery__format=value)
    r = mmsurgery("inspect", file)
    assert r.returncode == code, r.stderr
    if code:
        refused(r, f"{file}: mmsurgery.format is '{value}'")


def test_verify_refuses_a_newer_paired_file(ws, tmp_path: Path) -> None:
    paired = remeta(ws.p, tmp_path / "p3.safetensors", mmsurgery__format="paired/3")
    refused(mmsurgery("verify", ws.plain, "--against", paired), f"{paired}: mmsurgery.format is 'paired/3'", "upgrade")


# --- item 7: mmsurgery.vit metadata is parsed bounded -----------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = '{"num_heads": ' + "9" * 5000 + "}"


@pytest.mark.parametrize(
    ("side", "value", "why"),
    [("paired", DEEP, "nested too deeply"), ("paired", HUGE, "5,000 digits"), ("plain", DEEP, "nested too deeply")],
)
def test_verify_refuses_damaged_vit_metadata_in_one_line(ws, tmp_path: Path, side: str, value: str, why: str) -> None:
    """Before: a failed stage quoting a raw RecursionError / ValueError, exit 1."""
    src = ws.p if side == "paired" else ws.plain
    bad = remeta(src, tmp_path / "bad.safetensors", mmsurgery__vit=value)
    plain, paired = (ws.plain, bad) if side == "paired" else (bad, ws.p)
    refused(mmsurgery("verify", plain, "--against", paired), f"{bad}: metadata 'mmsurgery.vit' is not valid JSON", why)


def test_pair_with_heads_refuses_a_target_whose_vit_metadata_is_damaged(ws, tmp_path: Path) -> None:
    bad = remeta(ws.t, tmp_path / "t.safetensors", mmsurgery__vit=HUGE)
    refused(mmsurgery("pair", bad, ws.a, "--heads", "2", "--dry-run"), "metadata 'mmsurgery.vit' is not valid JSON")


# --- item 8: a header of a million tensors ------------------------------------------------------------------------


def _tiny_tensors_file(path: Path, n: int, key: str = "data_offsets") -> Path:
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"{key}":[{i},{i + 1}]}}' for i in range(n))
    header = ("{" + entries + "}").encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(n))
    return path


def test_a_million_tensor_header_is_refused_in_seconds(tmp_path: Path) -> None:
    """Before: 25-66 s and ~1 GB to parse every entry, then a refusal; now counted before parsing."""
    big = _tiny_tensors_file(tmp_path / "big.safetensors", 1_000_000)
    started = time.monotonic()
    refused(mmsurgery("inspect", big, timeout=20), f"{big}: not a valid safetensors file", "1,000,000 tensors")
    assert time.monotonic() - started < 20


def test_a_header_spelling_its_keys_with_escapes_is_still_bounded(tmp_path: Path, monkeypatch) -> None:
    """`"data\\u005foffsets"` escapes the count before parsing; the parse itself stops past the bound."""
    monkeypatch.setattr(safetensors_header, "MAX_TENSORS", 10)
    escaped = _tiny_tensors_file(tmp_path / "esc.safetensors", 20, key="data\\u005foffsets")
    with pytest.raises(BadInputError, match="more than 10 tensors"):
        safetensors_header.read_header(escaped)
    assert len(safetensors_header.read_header(_tiny_tensors_file(tmp_path / "ok.safetensors", 10)).entries) == 10


# --- item 9: folding an integer weight; a duplicated index key ----------------------------------------------------


@pytest.mark.parametrize("which", ["weight", "aux_weight"])
def test_fold_refuses_an_integer_weight_naming_it(ws, tmp_path: Path, which: str) -> None:
    """Before: an int32 W folded with exit 0, W + λ·W_aux silently truncated to integers."""
    name = f"blocks.0.attn.qkv.{which}"
    state = dict(ws.state)
    state[name] = (state[name] * 100).to(torch.int32)
    bad = tmp_path / "int.safetensors"
    save_file(state, bad, metadata=ws.meta)
    refused(mmsurgery("fold", bad, "-o", tmp_path / "o.safetensors"), f"{name}: int32, not floating point")
    assert not (tmp_path / "o.safetensors").exists()
    if which == "weight":  # verify's weights stage recomputes the fold the same way
        refused(mmsurgery("verify", ws.plain, "--against", bad, "--stages", "weights"), f"{name}: int32")


@pytest.mark.parametrize("side", ["t", "a"])
def test_pair_skips_an_integer_linear_fold_would_refuse(ws, tmp_path: Path, side: str) -> None:
    """A quantized (int8) target or auxiliary linear gets no pathway: the skip is reported with its dtype, and
    `--strict` makes it an error, instead of a paired file that fold refuses later."""
    name = "blocks.1.mlp.fc1.weight"
    state = load_file(getattr(ws, side))
    state[name] = (state[name] * 100).to(torch.int8)
    bad = tmp_path / f"{side}-int8.safetensors"
    save_file(state, bad)
    args = (bad, ws.a) if side == "t" else (ws.t, bad)
    out = tmp_path / "p.safetensors"
    r = mmsurgery("pair", *args, "-o", out, "--heads", "2", "--json")
    assert r.returncode == 0, r.stderr
    skips = json.loads(r.stdout)["skips"]
    assert [s["target"] for s in skips] == ["blocks.1.mlp.fc1.weight"]
    assert "int8: not floating point" in skips[0]["reason"]
    assert mmsurgery("fold", out, "-o", tmp_path / "plain.safetensors", "-q").returncode == 0  # the rest folds
    refused(mmsurgery("pair", *args, "--dry-run", "--strict", "--heads", "2"), "int8: not floating point")


def test_a_duplicated_weight_map_key_is_refused(ws, tmp_path: Path) -> None:
    """`json.loads` keeps the last of two equal keys: the first shard named for a tensor would be ignored."""
    folder = tmp_path / "sh"
    shutil.copytree(ws.sh, folder)
    index = folder / "model.safetensors.index.json"
    text = index.read_text()
    entry = '"blocks.0.attn.qkv.weight": '
    assert text.count(entry) == 1
    last = sorted(folder.glob("model-*.safetensors"))[-1].name
    index.write_text(text.replace(entry, f'{entry}"{last}", {entry}', 1))
    json.loads(index.read_text())  # still JSON to Python, which would keep the last
    for r in (mmsurgery("inspect", folder), mmsurgery("fold", folder, "-o", tmp_path / "o.safetensors")):
        refused(r, f"{index}: not a valid shard index", "'blocks.0.attn.qkv.weight' appears twice")


# --- item 10: no output inside an input's folder -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "out", "force"),
    [
        ("sh", "sh/model.safetensors", False),
        ("sh", "sh/model.safetensors", True),
        ("shl", "sh/model.safetensors", True),  # the input through a symlink
        ("sh", "shl/model.safetensors", False),  # the output through a symlink
        ("sh", "sh/x/", False),
        ("sh/model.safetensors.index.json", "sh/y.safetensors", True),
        ("hf", "hf/sub/", False),
        ("hf", "hf/model.plain.safetensors", True),
    ],
)
def test_fold_never_writes_inside_an_input_folder(ws, tmp_path: Path, source: str, out: str, force: bool) -> None:
    for name in ("sh", "hf"):
        shutil.copytree(getattr(ws, name), tmp_path / name)
    (tmp_path / "shl").symlink_to("sh")
    before = {name: tree(tmp_path / name) for name in ("sh", "hf")}
    r = mmsurgery("fold", source, "-o", out, *(["--force"] if force else []), cwd=tmp_path)
    folder = source.split("/")[0]
    refused(r, f"{out.rstrip('/')}", f"inside the input folder {folder}", "even with --force")
    assert {name: tree(tmp_path / name) for name in ("sh", "hf")} == before


def test_pair_never_writes_inside_an_input_folder(ws, tmp_path: Path) -> None:
    shutil.copytree(ws.tsh, tmp_path / "tsh")
    (tmp_path / "aux").mkdir()
    shutil.copy(ws.a, tmp_path / "aux" / "model.safetensors")
    before = tree(tmp_path)
    refused(
        mmsurgery("pair", "tsh", ws.a, "-o", "tsh/p.safetensors", "--force", cwd=tmp_path),
        "inside the input folder tsh",
    )
    refused(mmsurgery("pair", ws.t, "aux", "-o", "aux/p/", cwd=tmp_path), "inside the input folder aux")
    assert tree(tmp_path) == before


def test_default_outputs_of_sharded_inputs_go_beside_their_folder(ws, tmp_path: Path) -> None:
    """Before, `fold sh` wrote sh/model.plain.safetensors into the input folder; now the sibling folder sh.plain/
    (as for a model folder), and `pair tsh AUX` writes tsh.paired/."""
    for name in ("sh", "tsh"):
        shutil.copytree(getattr(ws, name), tmp_path / name)
    before = {name: tree(tmp_path / name) for name in ("sh", "tsh")}
    fold = mmsurgery("fold", "sh", "-q", cwd=tmp_path)
    assert fold.returncode == 0 and "wrote sh.plain/model.safetensors" in fold.stdout, fold.stdout + fold.stderr
    index = mmsurgery("fold", "sh/model.safetensors.index.json", "-q", "--force", cwd=tmp_path)
    assert index.returncode == 0 and "wrote sh.plain/model.safetensors" in index.stdout, index.stderr
    paired = mmsurgery("pair", "tsh", ws.a, "-q", cwd=tmp_path)
    assert paired.returncode == 0 and "tsh.paired" in paired.stdout, paired.stdout + paired.stderr
    assert {name: tree(tmp_path / name) for name in ("sh", "tsh")} == before
    folded = load_file(tmp_path / "sh.plain" / "model.safetensors")
    assert torch.equal(folded["blocks.0.attn.qkv.weight"], load_file(ws.plain)["blocks.0.attn.qkv.weight"])


def test_an_output_beside_a_file_named_directly_is_fine(ws, tmp_path: Path) -> None:
    """A file named directly occupies no folder: the default output beside it is written as always."""
    shutil.copy(ws.p, tmp_path / "x.paired.safetensors")
    r = mmsurgery("fold", "x.paired.safetensors", "-q", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "x.plain.safetensors").is_file(), r.stderr
