"""A Checkpoint reads the file it opened: a file replaced by rename (as `fold --force` and every atomic writer do)
is never read, and a file rewritten or truncated in place is refused as "changed while being read"."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pathway_fixtures import make_paired_state, tiny_vit
from safetensors.torch import save_file

from mmsurgery.checkpoint import pins
from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.cli import main
from mmsurgery.errors import BadInputError


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(64, 16, generator=g),
        "scale": torch.randn(1, generator=g),
        "b": torch.randn(8, generator=g),
    }


def replace_by_rename(path: Path, sd: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(sd, tmp)
    os.replace(tmp, path)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_file_replaced_by_rename_is_never_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    old, new = tensors(0), tensors(1)
    save_file(old, path)
    with open_checkpoint(path) as ck:
        size = ck.file_size
        replace_by_rename(path, new)
        replace_by_rename(path, {"a": torch.zeros(3)})  # a different layout too: the old header still rules
        assert ck.file_size == size != path.stat().st_size
        for name, want in old.items():
            assert torch.equal(ck.get(name), want), name
        assert ck.read_floats("scale") == [float(old["scale"])]


def test_the_provenance_hash_is_of_the_file_that_was_read(tmp_path: Path) -> None:
    """fold and pair hash their inputs on a thread while streaming: through the pinned descriptor, so the
    sha256 in the output's metadata is of the bytes that were folded, even if the path was replaced meanwhile."""
    import hashlib

    from mmsurgery.checkpoint.hashing import sha256_of

    path = tmp_path / "m.safetensors"
    save_file(tensors(0), path)
    old_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with open_checkpoint(path) as ck:
        replace_by_rename(path, tensors(1))
        assert sha256_of(ck.files) != old_digest  # by path: the replacement
        assert sha256_of(ck.files, ck.open_pinned) == old_digest
    before = open_fds()
    with open_checkpoint(path) as ck:
        sha256_of(ck.files, ck.open_pinned)
    assert open_fds() == before  # the duplicated descriptor is closed


def test_a_replaced_shard_is_never_read(tmp_path: Path) -> None:
    old = tensors(0)
    save_file({"a": old["a"]}, tmp_path / "s1.safetensors")
    save_file({"scale": old["scale"], "b": old["b"]}, tmp_path / "s2.safetensors")
    wm = {"a": "s1.safetensors", "scale": "s2.safetensors", "b": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    before = open_fds()
    with open_checkpoint(tmp_path) as ck:
        assert open_fds() == before + 2  # one descriptor per shard, held from open
        new = tensors(1)
        replace_by_rename(tmp_path / "s2.safetensors", {"scale": new["scale"], "b": new["b"]})
        assert all(torch.equal(ck.get(n), old[n]) for n in old)
    assert open_fds() == before


@pytest.mark.parametrize("how", ["truncate", "grow", "rewrite-same-size"])
def test_a_file_changed_in_place_is_refused(tmp_path: Path, how: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tensors(0), path)
    with open_checkpoint(path) as ck:
        raw = path.read_bytes()
        with path.open("r+b") as f:  # the same inode, as `cp` over it or a non-atomic writer would
            if how == "truncate":
                f.truncate(len(raw) - 100)
            elif how == "grow":
                f.seek(0, 2)
                f.write(b"\0" * 10)
            else:
                f.seek(len(raw) - 64)
                f.write(bytes(64))
        if how == "rewrite-same-size":  # timestamps are coarse (a kernel tick): make the write's mtime visible
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        for read in (ck.get, ck.read_floats):
            with pytest.raises(BadInputError, match="changed while being read"):
                read("scale" if read == ck.read_floats else "a")


def test_a_file_replaced_while_its_header_is_read_is_still_the_old_file(tmp_path: Path, monkeypatch) -> None:
    """The header is read through the descriptor opened first: a file replaced between the open and the header
    read cannot pair one file's header with another's bytes; the checkpoint is the old file, whole."""
    path = tmp_path / "m.safetensors"
    old = tensors(0)
    save_file(old, path)
    real = pins.read_header

    def racing(p: Path, fd: int):
        replace_by_rename(p, {"other": torch.ones(5)})
        return real(p, fd)

    monkeypatch.setattr(pins, "read_header", racing)
    with open_checkpoint(path) as ck:
        assert sorted(ck.infos) == sorted(old)
        assert all(torch.equal(ck.get(n), v) for n, v in old.items())


def test_failed_open_and_close_leave_no_descriptor(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    (tmp_path / "s2.safetensors").write_bytes(b"not a safetensors file")
    wm = {"a": "s1.safetensors", "b": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    before = open_fds()
    with pytest.raises(BadInputError, match="not a valid safetensors"):
        open_checkpoint(tmp_path)
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(BadInputError, match="empty state dict"):
        open_checkpoint(tmp_path / "empty.safetensors")
    assert open_fds() == before


def test_fold_force_over_an_open_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The scenario of the issue, through the CLI: `fold --force` replaces a file another reader has open."""
    model = tiny_vit(0)
    plain_path = tmp_path / "plain.safetensors"
    old = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(old, plain_path)
    paired = make_paired_state(model)
    for k in paired:
        if k.endswith("cross_modal_scale"):
            paired[k] = torch.full((1,), 0.5)
    save_file(paired, tmp_path / "paired.safetensors")
    with open_checkpoint(plain_path) as ck:
        code = main(["fold", str(tmp_path / "paired.safetensors"), "-o", str(plain_path), "--force"])
        assert code == 0, capsys.readouterr().err
        with open_checkpoint(plain_path) as folded:
            assert any(not torch.equal(folded.get(n), old[n]) for n in folded)  # the file really changed
        assert all(torch.equal(ck.get(n), old[n]) for n in old)
