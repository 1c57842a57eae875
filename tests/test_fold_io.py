"""The streaming fold's I/O (reused buffers, in-place float32 fold, early writeback): the bytes it writes are the
bytes of a reference fold computed tensor by tensor through `fold.PlainTensors` (fresh tensors, no buffers), and
the provenance digests are `hashlib.sha256` of the inputs."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmsurgery import __version__
from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.fold import fold_file, plain_tensors
from mmsurgery.models.vit import VisionTransformer, ViTConfig
from mmsurgery.paired_format import FOLDED_FORMAT, FORMAT_KEY, SCALES_KEY, SOURCE_KEY, VERSION_KEY
from mmsurgery.pairing import pair

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trained(tmp_path, extra: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32):
    """A paired file as training leaves it (non-zero λ, moved W_aux), optionally with many pass-through tensors."""
    torch.manual_seed(0)
    target = {k: v.to(dtype) for k, v in VisionTransformer(CFG).state_dict().items()} | (extra or {})
    save_file(target, tmp_path / "target.safetensors")
    torch.manual_seed(1)
    save_file({k: v.to(dtype) for k, v in VisionTransformer(CFG).state_dict().items()}, tmp_path / "aux.safetensors")
    res = pair(tmp_path / "target.safetensors", tmp_path / "aux.safetensors", tmp_path / "p.safetensors")
    assert res.plan.target.sha256 == _sha(tmp_path / "target.safetensors")
    assert res.plan.aux.sha256 == _sha(tmp_path / "aux.safetensors")
    from safetensors import safe_open

    with safe_open(res.output, "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    g = torch.Generator().manual_seed(2)
    for k in sd:
        if k.endswith("cross_modal_scale"):
            sd[k] = torch.randn(1, generator=g) * 0.3
        elif k.endswith("aux_weight"):
            sd[k] = (sd[k].float() + 0.01 * torch.randn(sd[k].shape, generator=g)).to(sd[k].dtype)
    save_file(sd, tmp_path / "trained.safetensors", metadata=meta)
    return tmp_path / "trained.safetensors"


def _reference(paired, dtype: str = "keep") -> tuple[list[str], dict[str, bytes]]:
    """Names in order and bytes of each output tensor, computed one fresh tensor at a time (no buffers)."""
    with open_checkpoint(paired) as ck:
        source = plain_tensors(ck, dtype)
        out = {}
        for s in source.specs:
            t = source.tensor(s.name)
            out[s.name] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return [s.name for s in source.specs], out


def _read_safetensors(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _check_file(path, names: list[str], ref: dict[str, bytes]) -> None:
    header, data = _read_safetensors(path)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    assert list(entries) == names  # the writer's order: the input's, pathway tensors dropped
    pos = 0
    for name in names:
        begin, end = entries[name]["data_offsets"]
        assert begin == pos, name
        assert data[begin:end] == ref[name], name
        pos = end
    assert pos == len(data)


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_fold_bytes_equal_a_tensor_by_tensor_reference_fold(tmp_path, dtype) -> None:
    paired = _trained(tmp_path)
    names, ref = _reference(paired, dtype)
    res = fold_file(paired, tmp_path / "plain.safetensors", dtype=dtype, source_hash=True)
    _check_file(res.output, names, ref)
    header, _ = _read_safetensors(res.output)
    meta = header["__metadata__"]
    assert meta[SOURCE_KEY] == res.sha256 == _sha(paired)
    assert meta[FORMAT_KEY] == FOLDED_FORMAT and meta[VERSION_KEY] == __version__
    assert json.loads(meta[SCALES_KEY]) == res.scales and len(res.scales) == 12
    # not trivial: the folded weights differ from the target's (λ ≠ 0) and pass-through tensors are the target's
    target = load_file(tmp_path / "target.safetensors")
    plain = load_file(res.output)
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(plain[w].float(), target[w].float())
    if dtype == "keep":
        assert torch.equal(plain["blocks.0.norm1.weight"], target["blocks.0.norm1.weight"])


def test_pass_through_heavy_fold(tmp_path) -> None:
    """Mostly tensors that pass through, of several dtypes and sizes, some larger than any pathway weight (so
    the reused buffers are sized by the largest input tensor), some empty."""
    g = torch.Generator().manual_seed(5)
    extra = {
        "buffers.big": torch.randn(300, 97, generator=g),
        "buffers.ids": torch.arange(1000, dtype=torch.int64),
        "buffers.half": torch.randn(33, 7, generator=g).half(),
        "buffers.mask": torch.rand(129, generator=g) > 0.5,
        "buffers.empty": torch.empty(0, 4),
        **{f"buffers.small.{i}": torch.randn(i + 1, generator=g) for i in range(40)},
    }
    paired = _trained(tmp_path, extra)
    names, ref = _reference(paired)
    assert sum(n.startswith("buffers.") for n in names) == len(extra)
    res = fold_file(paired, tmp_path / "plain.safetensors")
    _check_file(res.output, names, ref)
    plain = load_file(res.output)
    for k, v in extra.items():
        assert torch.equal(plain[k], v), k


def test_sharded_fold_bytes_and_digest(tmp_path) -> None:
    paired = _trained(tmp_path)
    names, ref = _reference(paired)
    res = fold_file(paired, tmp_path / "plain", shard_size=40_000, source_hash=True)
    folder = res.output.parent if res.output.name.endswith(".index.json") else res.output
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    seen: list[str] = []
    for shard in shards:
        header, _ = _read_safetensors(folder / shard)
        part = [k for k in header if k != "__metadata__"]
        _check_file(folder / shard, part, ref)
        assert header["__metadata__"][SOURCE_KEY] == _sha(paired)
        seen += part
    assert sorted(seen) == sorted(names)


def test_sharded_input_digest_and_bytes(tmp_path) -> None:
    """A sharded paired input: the recorded digest is sha256 of the shards' `name sha256` lines, each shard's
    digest hashlib's, and the output bytes are the reference fold's."""
    paired = _trained(tmp_path)
    folder = tmp_path / "sharded"
    sd = load_file(paired)
    from safetensors import safe_open

    with safe_open(paired, "pt") as f:
        meta = f.metadata()
    from mmsurgery.checkpoint import write_safetensors

    write_safetensors(folder, sd, metadata=meta, shard_size=60_000)
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 2
    names, ref = _reference(index)
    res = fold_file(index, tmp_path / "plain.safetensors", source_hash=True)
    _check_file(res.output, names, ref)
    lines = "".join(f"{s} {_sha(folder / s)}\n" for s in shards)
    assert res.sha256 == hashlib.sha256(lines.encode()).hexdigest()


def test_a_folded_file_keeps_exactly_the_documented_metadata(tmp_path) -> None:
    """docs/formats.md: a folded file keeps the paired file's non-`mmsurgery` entries, plans, `mmsurgery.vit` and
    input digests, and adds format/version/scales (+ source with --source-hash); nothing else is carried, not
    `init_scale`, `scale_mode` or an unknown `mmsurgery.*` key, and never a stale `source_sha256`."""
    from safetensors import safe_open

    paired = _trained(tmp_path)
    with safe_open(paired, "pt") as f:
        meta = dict(f.metadata())
    assert {"mmsurgery.init_scale", "mmsurgery.target_sha256", "mmsurgery.aux_sha256"} <= set(meta)
    stale = {**meta, "mmsurgery.unknown": "x", SOURCE_KEY: "0" * 64, "owner": "lab"}
    save_file(load_file(paired), tmp_path / "stale.safetensors", metadata=stale)
    res = fold_file(tmp_path / "stale.safetensors", tmp_path / "plain.safetensors", source_hash=True)
    with safe_open(res.output, "pt") as f:
        folded = dict(f.metadata())
    carried = {k: meta[k] for k in ("mmsurgery.plan", "mmsurgery.target_sha256", "mmsurgery.aux_sha256")}
    assert {k: folded[k] for k in carried} == carried and folded["owner"] == "lab"
    assert set(folded) == {
        "format",
        "owner",
        FORMAT_KEY,
        VERSION_KEY,
        SCALES_KEY,
        SOURCE_KEY,
        *carried,
        *({"mmsurgery.vit"} & set(meta)),
    }
    assert folded[SOURCE_KEY] == _sha(tmp_path / "stale.safetensors") == res.sha256
