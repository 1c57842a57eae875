"""Issue 11, part 3: outputs are atomic and exclusive, and faults (races, inputs as outputs, signals, a dead
writer's temps, names too long, unwritable folders) end in one clean error or a clean folder."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmsurgery.checkpoint import open_checkpoint, write_safetensors
from mmsurgery.checkpoint.reader import TensorInfo
from mmsurgery.checkpoint.writer import TEMP_SUFFIX, SafetensorsWriter
from mmsurgery.errors import BadInputError, OutputExistsError
from mmsurgery.models.vit import VisionTransformer, ViTConfig
from mmsurgery.pairing import pair

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
SPECS = [TensorInfo(f"t{i}", "float32", (1024,)) for i in range(4)]  # 4 KiB each: "4KB" shards hold one

# A writer that stops after two tensors (ready file written) until a signal arrives; argv: out, shard, ready.
SLOW_WRITER = """
import sys, time, torch
from pathlib import Path
from mmsurgery.checkpoint.reader import TensorInfo
from mmsurgery.checkpoint.writer import SafetensorsWriter
out, shard, ready = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3])
specs = [TensorInfo(f"t{i}", "float32", (1024,)) for i in range(4)]
with SafetensorsWriter(out, specs, shard_size=shard) as w:
    for i, s in enumerate(specs):
        w.write(s.name, torch.full((1024,), float(i)))
        if i == 1:
            ready.write_text("writing")
            time.sleep(60)
    w.commit()
"""

# A sharded writer into an existing folder that dies by SIGKILL between publishing its shards and its index.
KILLED_AT_INDEX = """
import os, signal, sys, torch
import mmsurgery.checkpoint.publish as pub
import mmsurgery.checkpoint.writer as wr
from mmsurgery.checkpoint.reader import TensorInfo
real = pub.link
def link(src, dst, force):
    if dst.name.endswith(".index.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, force)
pub.link = link
specs = [TensorInfo(f"t{i}", "float32", (1024,)) for i in range(4)]
with wr.SafetensorsWriter(sys.argv[1], specs, shard_size="4KB") as w:
    for s in specs:
        w.write(s.name, torch.zeros(1024))
    w.commit()
"""


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {s.name: torch.full((1024,), value) for s in SPECS}


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX))


def digests(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def run_until_ready(tmp_path: Path, out: Path, shard: str = "") -> subprocess.Popen[bytes]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out), shard, str(ready)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the writer never got going"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("shard", [None, "4KB"], ids=["single", "sharded"])
def test_concurrent_writers_exactly_one_wins(tmp_path, shard) -> None:
    """Writer A starts first, B commits first: A's commit must fail, not replace B's output."""
    out = tmp_path / ("o.safetensors" if shard is None else "o")
    loser = SafetensorsWriter(out, SPECS, shard_size=shard)
    with pytest.raises(OutputExistsError, match="appeared while writing"), loser as a:
        for name, t in tensors(1.0).items():
            a.write(name, t)
        won = write_safetensors(out, tensors(2.0), shard_size=shard)  # B starts after A, commits before A
        a.commit()
    with open_checkpoint(won.path) as ck:
        assert all(torch.equal(ck.get(s.name), torch.full((1024,), 2.0)) for s in SPECS)  # whole, and B's
    assert temps(tmp_path) == []  # the loser removed its temps


def test_concurrent_sharded_writers_into_an_existing_folder(tmp_path) -> None:
    """Into an existing folder the shards are linked one by one: the loser rolls back what it linked."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "README").write_text("keep")
    with pytest.raises(OutputExistsError), SafetensorsWriter(out, SPECS, shard_size="4KB") as a:
        for name, t in tensors(1.0).items():
            a.write(name, t)
        won = write_safetensors(out, tensors(2.0), shard_size="4KB")
        a.commit()
    with open_checkpoint(won.path) as ck:
        assert torch.equal(ck.get("t3"), torch.full((1024,), 2.0))
    assert sorted(p.name for p in out.iterdir()) == sorted(["README", won.index.name, *(f.name for f in won.files)])


def test_index_appearing_last_rolls_back_the_linked_shards(tmp_path) -> None:
    """The loser got as far as linking all its shards; the index it could not publish makes it unlink them."""
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(OutputExistsError), SafetensorsWriter(out, SPECS, shard_size="4KB") as a:
        for name, t in tensors(1.0).items():
            a.write(name, t)
        (out / "model.safetensors.index.json").write_text("{}")  # someone else's, appeared meanwhile
        a.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors.index.json"]
    assert (out / "model.safetensors.index.json").read_text() == "{}"


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    """A paired single file and the same tensors as a sharded set in `sh/`."""
    torch.manual_seed(0)
    save_file(VisionTransformer(CFG).state_dict(), tmp_path / "target.safetensors")
    torch.manual_seed(1)
    save_file(VisionTransformer(CFG).state_dict(), tmp_path / "aux.safetensors")
    paired = pair(tmp_path / "target.safetensors", tmp_path / "aux.safetensors", tmp_path / "p.safetensors").output
    index = write_safetensors(tmp_path / "sh", load_file(paired), shard_size="30KB").path
    return paired, index


@pytest.mark.parametrize(
    "case",
    ["single file", "shard folder", "shard folder, one file out", "its index", "one of its shards"],
)
def test_force_never_overwrites_an_input(inputs, cli, case) -> None:
    paired, index = inputs
    sh = index.parent
    shard = sorted(sh.glob("model-*.safetensors"))[0]
    src, out, extra = {
        "single file": (paired, paired, []),
        "shard folder": (index, sh, ["--shard-size", "30KB"]),
        "shard folder, one file out": (index, sh, []),
        "its index": (index, sh / "model.safetensors", ["--shard-size", "30KB"]),
        "one of its shards": (index, shard, []),
    }[case]
    before = digests(paired, sh)
    listing = sorted(p.name for p in sh.iterdir())
    r = cli("fold", src, "-o", out, "--force", *extra)
    assert r.code == 2 and "input" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert digests(paired, sh) == before and sorted(p.name for p in sh.iterdir()) == listing
    with open_checkpoint(index) as ck:
        assert len(ck.files) > 1  # the sharded input still opens


def test_sigterm_mid_write_removes_the_temps(tmp_path) -> None:
    out = tmp_path / "x.safetensors"
    proc = run_until_ready(tmp_path, out)
    assert temps(tmp_path)  # mid-write: the temp exists, so its absence below means something
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM
    assert temps(tmp_path) == [] and not out.exists()


def test_sigkill_leaves_temps_that_the_next_writer_removes_but_not_a_live_ones(tmp_path) -> None:
    out = tmp_path / "x.safetensors"
    proc = run_until_ready(tmp_path, out)
    proc.kill()
    proc.wait(timeout=20)
    stale = temps(tmp_path)
    assert stale and all(f".{proc.pid}." in n for n in stale)
    live = tmp_path / f".x.safetensors.{os.getpid()}.abcd1234{TEMP_SUFFIX}"  # a live process's temp
    live.write_bytes(b"busy")
    other = tmp_path / f".y.safetensors.{proc.pid}.abcd1234{TEMP_SUFFIX}"  # dead, but another output's
    other.write_bytes(b"not ours")
    res = write_safetensors(out, tensors(3.0))
    assert temps(tmp_path) == sorted([live.name, other.name])
    assert torch.equal(load_file(res.path)["t0"], torch.full((1024,), 3.0))


def test_sharded_output_killed_before_commit_shows_nothing(tmp_path) -> None:
    out = tmp_path / "sharded"
    proc = run_until_ready(tmp_path, out, "4KB")
    proc.kill()
    proc.wait(timeout=20)
    assert not out.exists()  # no partial set at the destination: it appears by one rename, or not at all
    assert temps(tmp_path)  # the dead writer's temp folder
    res = write_safetensors(out, tensors(4.0), shard_size="4KB")
    assert temps(tmp_path) == [] and len(res.files) == 4


def test_killed_between_shards_and_index_is_cleaned_by_the_next_writer(tmp_path) -> None:
    """Into an existing folder the index is the commit point; a rerun removes the index-less shards it can
    prove are the dead writer's (same inode as in its temp folder) and nothing else."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "README").write_text("keep")
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_INDEX, str(out)], timeout=60, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    orphans = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(orphans) == 4 and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(BadInputError, match="several weight files"):
        open_checkpoint(out)
    res = write_safetensors(out / "model.safetensors", tensors(5.0))  # the next writer to that output
    assert sorted(p.name for p in out.iterdir()) == ["README", "model.safetensors"]
    assert temps(out) == [] and torch.equal(load_file(res.path)["t1"], torch.full((1024,), 5.0))


def test_name_too_long_is_bad_input(tmp_path) -> None:
    long = tmp_path / ("x" * 300 + ".safetensors")
    with pytest.raises(BadInputError, match=r"x\.safetensors: cannot write the output: .*(too long|bytes)"):
        write_safetensors(long, tensors(1.0))
    with pytest.raises(BadInputError, match=r"cannot write the output: .*(too long|bytes)"):
        write_safetensors(tmp_path / ("d" * 300), tensors(1.0))  # a folder name too long
    assert temps(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_unwritable_folder_is_bad_input(tmp_path, monkeypatch, code) -> None:
    """Root ignores chmod, so the kernel's answer is simulated where the writer asks for its temp file."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(BadInputError, match=f"x.safetensors: cannot write the output: {os.strerror(code)}"):
        write_safetensors(tmp_path / "x.safetensors", tensors(1.0))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into a 0o500 folder anyway")
def test_read_only_folder_is_bad_input_for_real(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(BadInputError, match="cannot write"):
            write_safetensors(ro / "x.safetensors", tensors(1.0))
    finally:
        ro.chmod(0o700)


def test_unwritable_output_through_the_cli_is_one_line_exit_2(inputs, tmp_path, monkeypatch, cli) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    r = cli("fold", inputs[0], "-o", tmp_path / "f.safetensors")
    assert r.code == 2 and "f.safetensors: cannot write the output: Permission denied" in r.err


def test_output_path_must_say_file_or_folder(tmp_path) -> None:
    with pytest.raises(
        BadInputError, match=r"out\.st: .*write out\.st\.safetensors for a file, or out\.st/ for a new folder"
    ):
        write_safetensors(tmp_path / "out.st", tensors(1.0))
    assert list(tmp_path.iterdir()) == []  # no folder silently created
    res = write_safetensors(f"{tmp_path / 'out.st'}/", tensors(1.0))  # a trailing `/` says folder
    assert res.path == tmp_path / "out.st" / "model.safetensors"


def test_cli_output_ending_in_a_slash_is_a_new_folder(tmp_path, cli) -> None:
    """`-o new.d/` from the command line: typer must not turn it into a Path (which drops the "/")."""
    from test_verify_weights import _builtin

    from mmsurgery.pairing import pair

    _builtin(tmp_path)
    paired = pair(tmp_path / "target.safetensors", tmp_path / "aux.safetensors", tmp_path / "p.safetensors").output
    r = cli("fold", paired, "-o", f"{tmp_path / 'new.d'}/")
    assert r.code == 0, r.err
    assert (tmp_path / "new.d" / "model.safetensors").is_file()
    assert cli("fold", paired, "-o", tmp_path / "new.st").code == 2
