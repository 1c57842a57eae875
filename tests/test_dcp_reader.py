"""The DCP folder reader (`checkpoint.formats.dcp_folder`) on single-process `dcp.save` output and on folders laid out
as a multi-rank save lays them out (written here with torch's own metadata classes, and checked to load with
torch's own `dcp.load`): names, values, reassembly of chunks, unwrapping, provenance, and every damaged or hostile
input ending in one line and exit 2. The 2-process FSDP2 test is tests/test_fsdp.py."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from pathway_fixtures import make_paired_state, tiny_vit
from safetensors.torch import load_file
from test_malicious_pickles import CASES, as_torch_zip
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.checkpoint.hashing import sha256_of
from mmsurgery.errors import BadInputError, UnsafeCheckpointError
from mmsurgery.fold import fold_file
from mmsurgery.paired_format import SOURCE_KEY

SCRIPT = Path(sys.executable).with_name("mmsurgery")

Chunk = tuple[tuple[int, ...], torch.Tensor, str]  # (offsets in the global tensor, the chunk, its .distcp file)


def save_dcp(state: dict[str, object], folder: Path) -> Path:
    """`dcp.save` in this one process (no process group), as a single-GPU run would."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming ... a single process"
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    return folder


def split(t: torch.Tensor, dim: int, ranks: int) -> list[Chunk]:
    """`t` sharded along `dim` as FSDP2 does (torch.chunk sizes; a rank past the end holds an empty shard)."""
    size = -(-t.shape[dim] // ranks) if t.shape[dim] else 0
    chunks = []
    for r in range(ranks):
        start = min(r * size, t.shape[dim])
        part = t.narrow(dim, start, max(min(size, t.shape[dim] - start), 0))
        offsets = tuple(start if d == dim else 0 for d in range(t.ndim))
        chunks.append((offsets, part.clone(), f"__{r}_0.distcp"))
    return chunks


def write_dcp(folder: Path, tensors: dict[str, tuple[torch.Tensor, list[Chunk]]], **edits: object) -> Path:
    """A DCP folder as ranks write it: each chunk a `torch.save` archive appended to its rank's file, `.metadata`
    pickled from torch's own dataclasses. `edits` patch `Metadata` fields after the fact (damage)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, io.BytesIO] = {}
    entries, storage = {}, {}
    for name, (full, chunks) in tensors.items():
        entries[name] = TensorStorageMetadata(
            TensorProperties(dtype=full.dtype),
            torch.Size(full.shape),
            [ChunkStorageMetadata(torch.Size(o), torch.Size(c.shape)) for o, c, _ in chunks],
        )
        for offsets, chunk, file in chunks:
            buf = files.setdefault(file, io.BytesIO())
            start = buf.tell()
            torch.save(chunk, buf)
            storage[MetadataIndex(name, offsets)] = _StorageInfo(file, start, buf.tell() - start)
    for file, buf in files.items():
        (folder / file).write_bytes(buf.getvalue())
    meta = Metadata(state_dict_metadata=entries, storage_data=storage, version="1.0.0")
    for field, value in edits.items():
        setattr(meta, field, value)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def torch_load_dcp(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch's own reader, the reference: `dcp.load` into zeroed tensors of the right shapes."""
    out = {k: torch.zeros_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(out, checkpoint_id=folder, no_dist=True)
    return out


def trained_state() -> dict[str, torch.Tensor]:
    """A paired state with non-zero λ, so a fold of it differs from the plain weights."""
    model = tiny_vit()
    state = make_paired_state(model)
    return {k: torch.full((1,), 0.25) if k.endswith("cross_modal_scale") else v for k, v in state.items()}


def sharded(state: dict[str, torch.Tensor], ranks: int = 2) -> dict[str, tuple[torch.Tensor, list[Chunk]]]:
    return {k: (v, split(v, 0, ranks) if v.ndim else [((), v.clone(), "__0_0.distcp")]) for k, v in state.items()}


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def one_line_exit_2(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


# --- reading ---------------------------------------------------------------------------------------------------


def test_single_process_dcp_save_reads_back_exactly(tmp_path: Path) -> None:
    state = trained_state()
    folder = save_dcp(state, tmp_path / "ckpt")
    for given in (folder, folder / ".metadata"):
        with open_checkpoint(given) as ck:
            assert ck.format == "dcp" and ck.path == folder
            assert sorted(ck.keys()) == sorted(state)
            assert all(torch.equal(ck.get(k), v) and ck.info(k).shape == tuple(v.shape) for k, v in state.items())
            assert ck.files == [folder / ".metadata", folder / "__0_0.distcp"]
            assert ck.read_floats("blocks.0.attn.qkv.cross_modal_scale") == [0.25]


def test_chunks_of_two_ranks_are_reassembled_like_torchs_own_reader(tmp_path: Path) -> None:
    """Rows split over two files (FSDP2's layout, λ [1] on rank 0 and an empty shard on rank 1), a tensor split
    along dim 1 over three ranks, a 0-d tensor, and bfloat16: each equals the original and torch's `dcp.load`."""
    state = trained_state()
    layout = sharded(state)
    extra = {
        "cols": torch.randn(4, 7),
        "scalar": torch.tensor(3.5),
        "half": torch.randn(5, 3).to(torch.bfloat16),
    }
    layout |= {
        "cols": (extra["cols"], split(extra["cols"], 1, 3)),
        "scalar": (extra["scalar"], [((), extra["scalar"], "__0_0.distcp")]),
    }
    layout |= {"half": (extra["half"], split(extra["half"], 0, 2))}  # fmt: skip
    assert [c.shape for _, c, _ in layout["blocks.0.attn.qkv.cross_modal_scale"][1]] == [(1,), (0,)]
    folder = write_dcp(tmp_path / "ckpt", layout)
    expected = state | extra
    reference = torch_load_dcp(folder, expected)
    with open_checkpoint(folder) as ck:
        for k, v in expected.items():
            got = ck.get(k)
            assert got.dtype == v.dtype and torch.equal(got, v) and torch.equal(got, reference[k]), k
        assert ck.files == [
            folder / ".metadata",
            folder / "__0_0.distcp",
            folder / "__1_0.distcp",
            folder / "__2_0.distcp",
        ]


def test_a_wrapped_state_is_unwrapped_like_a_pickle_and_key_picks_an_entry(tmp_path: Path) -> None:
    state = trained_state()
    opt_state = {"state": {"0": {"exp_avg": torch.ones(3)}}, "lr": 0.1}
    folder = save_dcp({"model": state, "optim": opt_state, "step": 7}, tmp_path / "ckpt")
    with open_checkpoint(folder) as ck:  # automatic: `model` is one of normalize.UNWRAP_KEYS
        assert sorted(ck.keys()) == sorted(state) and ck.unwrap_path == ("model",)
        assert ck.ignored == {"optim": "dict", "step": "object (not read)"}
    with open_checkpoint(folder, key="model") as ck:
        assert torch.equal(ck.get("blocks.1.mlp.fc2.weight"), state["blocks.1.mlp.fc2.weight"])
    with open_checkpoint(folder, key="optim/state/0") as ck:
        assert ck.keys() == ["exp_avg"]
    with pytest.raises(BadInputError, match=r"--key 'nope': no entry 'nope' \(entries: model, optim, step\)"):
        open_checkpoint(folder, key="nope")


def test_module_prefixes_are_stripped(tmp_path: Path) -> None:
    folder = save_dcp({f"module._orig_mod.{k}": v for k, v in trained_state().items()}, tmp_path / "ckpt")
    with open_checkpoint(folder) as ck:
        assert "blocks.0.attn.qkv.weight" in ck


@pytest.mark.slow
def test_cli_fold_of_a_dcp_folder_equals_the_fold_of_the_same_state_as_safetensors(tmp_path: Path, cli) -> None:
    """Through the console script: folding the sharded DCP folder and the same state saved as one safetensors
    file gives bit-identical tensors (exact: the same `fold_weight` on the same bits); the fold differs from
    the plain weights (λ = 0.25), so the comparison cannot pass trivially. The provenance hash is of the DCP
    files, as `sha256_of` computes it for a sharded set. `inspect` shows λ per layer."""
    from mmsurgery.checkpoint import write_safetensors

    state = trained_state()
    folder = write_dcp(tmp_path / "ckpt", sharded(state))
    r = run_cli("fold", folder, "-o", tmp_path / "a.safetensors", "--source-hash")
    assert r.returncode == 0, r.stderr
    write_safetensors(tmp_path / "paired.safetensors", state)
    fold_file(tmp_path / "paired.safetensors", tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    plain = tiny_vit().state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], plain["blocks.0.attn.qkv.weight"])
    with open_checkpoint(tmp_path / "a.safetensors") as ck:
        files = [folder / ".metadata", folder / "__0_0.distcp", folder / "__1_0.distcp"]
        assert ck.metadata[SOURCE_KEY] == sha256_of(files)
    r = cli("inspect", folder, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["format"] == "dcp"
    assert {x["layer"]: x["scale"] for x in report["pathway"]["layers"]} == {
        k.removesuffix(".cross_modal_scale"): 0.25 for k in state if k.endswith("cross_modal_scale")
    }
    assert "λ per layer" in cli("inspect", folder).out


def test_cli_fold_key_picks_the_model_of_a_training_checkpoint(tmp_path: Path, cli) -> None:
    state = trained_state()
    folder = save_dcp({"model": state, "optim": {"step": torch.tensor(3.0)}}, tmp_path / "ckpt")
    r = cli("fold", folder, "--key", "model", "-o", tmp_path / "plain.safetensors")
    assert r.code == 0, r.err
    fold_file(save_dcp(state, tmp_path / "flat"), tmp_path / "flat.safetensors")
    a, b = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "flat.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = cli("fold", folder, "--key", "optim", "-o", tmp_path / "x.safetensors")
    assert r.code == 0 and "already plain" in r.out, (r.code, r.out, r.err)  # the optimizer's entry: no pathway


def test_fold_refuses_to_write_into_the_dcp_folder(tmp_path: Path) -> None:
    folder = save_dcp(trained_state(), tmp_path / "ckpt")
    with pytest.raises(BadInputError, match="inside the input folder"):
        fold_file(folder, folder / "plain.safetensors")


# --- hostile and damaged inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_a_malicious_metadata_is_refused_unexecuted_and_the_global_named(tmp_path: Path, case: str) -> None:
    """tests/test_malicious_pickles.py's live corpus (each runs under plain `pickle.loads`) as `.metadata`."""
    marker = tmp_path / "MARKER"
    payload, real, _ = CASES[case](marker)
    folder = save_dcp(trained_state(), tmp_path / "ckpt")
    (folder / ".metadata").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError) as e:
        open_checkpoint(folder)
    assert not marker.exists(), "the payload ran"
    assert any(f"refused to unpickle global {g};" in str(e.value) for g in real), str(e.value)


def test_a_malicious_global_inside_real_metadata_is_refused(tmp_path: Path, cli) -> None:
    class Call:
        def __reduce__(self) -> tuple[object, ...]:
            return os.system, (f"touch {tmp_path / 'MARKER'}",)

    folder = write_dcp(tmp_path / "ckpt", sharded(trained_state()), storage_meta=Call())
    r = cli("inspect", folder)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert f"refused to unpickle global {os.system.__module__}.system;" in r.err
    assert not (tmp_path / "MARKER").exists()


def test_metadata_values_cannot_be_rebuilt_into_other_names(tmp_path: Path) -> None:
    """A pickle may BUILD onto any object it made: a dtype rewritten to name `torch.load` is refused as damage."""
    from mmsurgery.checkpoint.dcp_metadata import unpickle_metadata

    data = b"\x80\x02ctorch\nfloat32\n}X\x04\x00\x00\x00nameX\x04\x00\x00\x00loadsb."  # GLOBAL {} SETITEM BUILD
    with pytest.raises(BadInputError, match="not a DCP metadata file"):
        unpickle_metadata(tmp_path / ".metadata", data)


def test_a_malicious_chunk_is_refused_by_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    folder = write_dcp(tmp_path / "ckpt", {"w": (torch.zeros(2), [((0,), torch.zeros(2), "__0_0.distcp")])})
    evil = as_torch_zip(CASES["global_reduce_nested"](marker)[0], tmp_path / "evil").read_bytes()
    (folder / "__0_0.distcp").write_bytes(evil)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    meta.storage_data[MetadataIndex("w", (0,))] = _StorageInfo("__0_0.distcp", 0, len(evil))
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with open_checkpoint(folder) as ck, pytest.raises(BadInputError, match="not a readable tensor") as e:
        ck.get("w")
    assert not marker.exists() and "weights_only=False" not in str(e.value) and "\n" not in str(e.value)


def _damage(folder: Path, how: str) -> None:
    meta_path = folder / ".metadata"
    meta = pickle.loads(meta_path.read_bytes())
    qkv = "blocks.0.attn.qkv.weight"
    entry = meta.state_dict_metadata[qkv]
    if how == "truncated distcp":
        f = folder / "__1_0.distcp"
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "missing shard file":
        (folder / "__1_0.distcp").unlink()
    elif how == "no metadata":
        meta_path.unlink()
    elif how == "per-rank metadata":
        meta_path.rename(folder / "__0.metadata")
    elif how == "truncated metadata":
        meta_path.write_bytes(meta_path.read_bytes()[:-40])
    elif how == "not a pickle":
        meta_path.write_bytes(b"\x00garbage" * 10)
    elif how == "not metadata":
        meta_path.write_bytes(pickle.dumps({"a": 1}))
    elif how == "offset past EOF":
        key = next(k for k in meta.storage_data if k.fqn == qkv)
        info = meta.storage_data[key]
        meta.storage_data[key] = _StorageInfo(info.relative_path, 10**9, info.length)
    elif how == "path outside the folder":
        key = next(k for k in meta.storage_data if k.fqn == qkv)
        meta.storage_data[key] = _StorageInfo("../__0_0.distcp", 0, 100)
    elif how == "overlapping chunks":  # rows 40..88 and 0..48: as many elements as the tensor, some twice
        entry.chunks[1] = ChunkStorageMetadata(torch.Size([40, 0]), entry.chunks[1].sizes)
        meta.storage_data[MetadataIndex(qkv, (40, 0))] = meta.storage_data.pop(MetadataIndex(qkv, (48, 0)))
    elif how == "a gap":
        entry.chunks[1] = ChunkStorageMetadata(entry.chunks[1].offsets, torch.Size([40, 32]))
    elif how == "chunk outside the tensor":
        entry.chunks[1] = ChunkStorageMetadata(torch.Size([60, 0]), entry.chunks[1].sizes)
    elif how == "no storage for a chunk":
        del meta.storage_data[next(k for k in meta.storage_data if k.fqn == qkv)]
    elif how == "chunk stored in too few bytes":
        key = next(k for k in meta.storage_data if k.fqn == qkv)
        meta.storage_data[key] = _StorageInfo(meta.storage_data[key].relative_path, 0, 100)
    elif how in ("huge shape", "huge tensor in a small file"):  # one chunk claiming 2**80 or 2**62 elements
        dim = 2**40 if how == "huge shape" else 2**31
        meta.state_dict_metadata[qkv] = TensorStorageMetadata(
            entry.properties, torch.Size([dim, dim]), [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([dim, dim]))]
        )
    elif how == "stream transforms":
        key = next(k for k in meta.storage_data if k.fqn == qkv)
        info = meta.storage_data[key]
        meta.storage_data[key] = _StorageInfo(info.relative_path, info.offset, info.length, ["ZStandard"])
    elif how == "wrong shape in the chunk":
        meta.state_dict_metadata[qkv] = TensorStorageMetadata(entry.properties, torch.Size([96, 16]), [
            ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([48, 16])),
            ChunkStorageMetadata(torch.Size([48, 0]), torch.Size([48, 16])),
        ])  # fmt: skip
        meta.storage_data = {
            (MetadataIndex(k.fqn, (k.offset[0], 0)) if k.fqn == qkv else k): v for k, v in meta.storage_data.items()
        }
    elif how == "wrong bytes in a chunk":
        key = next(k for k in meta.storage_data if k.fqn == qkv)
        info = meta.storage_data[key]
        f = folder / info.relative_path
        data = bytearray(f.read_bytes())
        data[info.offset : info.offset + 4] = b"PK\x03\x04"  # the magic survives; the archive does not
        data[info.offset + 30 : info.offset + info.length - 30] = bytes(info.length - 60)
        f.write_bytes(bytes(data))
    else:
        raise AssertionError(how)
    if meta_path.exists() and how not in ("truncated metadata", "not a pickle", "not metadata"):
        meta_path.write_bytes(pickle.dumps(meta))


DAMAGE = {  # how -> (text of the one-line error, raised at open (else at the first read of the tensor))
    "truncated distcp": ("lies past the end of the file", True),
    "missing shard file": ("shard file '__1_0.distcp' named in .metadata is missing", True),
    "no metadata": (".distcp files without their .metadata", True),
    "per-rank metadata": ("per-rank metadata (__0.metadata) from a save without collectives", True),
    "truncated metadata": ("not a DCP metadata file", True),
    "not a pickle": ("not a DCP metadata file", True),
    "not metadata": ("holds a dict, not a torch.distributed.checkpoint Metadata", True),
    "offset past EOF": ("lies past the end of the file", True),
    "path outside the folder": ("not a file of the checkpoint's folder", True),
    "overlapping chunks": ("overlap", True),
    "a gap": ("its chunks hold 2816 elements, the tensor 3072", True),
    "chunk outside the tensor": ("lies outside [96, 32]", True),
    "no storage for a chunk": ("has no storage entry", True),
    "chunk stored in too few bytes": ("is stored in 100 bytes, its 1536 elements need 6144", True),
    "huge shape": ("has more elements than torch can lay out", True),
    "huge tensor in a small file": (f"its {2**62} elements need {2**64}", True),
    "stream transforms": ("stream transforms (ZStandard)", True),
    "wrong shape in the chunk": ("holds float32 [48, 32], .metadata says float32 [48, 16]", False),
    "wrong bytes in a chunk": ("not a readable tensor", False),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_folder_is_one_bad_input_error(tmp_path: Path, how: str) -> None:
    folder = write_dcp(tmp_path / "ckpt", sharded(trained_state()))
    _damage(folder, how)
    text, at_open = DAMAGE[how]
    with pytest.raises(BadInputError) as e, open_checkpoint(folder) as ck:
        assert not at_open, "opened"
        ck.get("blocks.0.attn.qkv.weight")
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_cli_damaged_and_hostile_folders_exit_2_with_one_line(tmp_path: Path) -> None:
    """The console script in a subprocess: a chunk damaged past its zip magic (found only when read, mid-fold)
    and a hostile `.metadata` each end in one line and exit 2, and nothing is written or run."""
    folder = write_dcp(tmp_path / "damaged", sharded(trained_state()))
    _damage(folder, "wrong bytes in a chunk")
    assert "not a readable tensor" in one_line_exit_2(run_cli("fold", folder, "-o", tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()
    folder = save_dcp(trained_state(), tmp_path / "evil")
    (folder / ".metadata").write_bytes(CASES["stack_global_from_memo"](tmp_path / "MARKER")[0])
    assert "refused to unpickle global os.system;" in one_line_exit_2(run_cli("inspect", folder))
    assert not (tmp_path / "MARKER").exists()


def test_a_safetensors_format_dcp_save_is_refused_by_name(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    writer = FileSystemWriter(tmp_path / "ckpt", serialization_format=SerializationFormat.SAFETENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(trained_state(), storage_writer=writer, no_dist=True)
    with pytest.raises(BadInputError, match="serialization_format=SAFETENSORS"):
        open_checkpoint(tmp_path / "ckpt")


@pytest.mark.slow
def test_reading_streams_memory_near_one_tensor(tmp_path: Path) -> None:
    """Six 32 MiB tensors in two ranks' files (192 MiB): reading them one at a time in a fresh process raises
    peak RSS by about one tensor plus one chunk (48 MiB), not the checkpoint; the bound (2.5 tensors, 80 MiB)
    leaves room for allocator slack."""
    gen = torch.Generator().manual_seed(0)
    big = {f"t{i}": torch.randn(2048, 4096, generator=gen) for i in range(6)}
    folder = write_dcp(tmp_path / "ckpt", {k: (v, split(v, 0, 2)) for k, v in big.items()})
    del big
    code = (
        "import resource, torch\n"
        "from mmsurgery.checkpoint import open_checkpoint\n"
        f"ck = open_checkpoint({str(folder)!r})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "total = 0.0\n"
        "for name, t in ck.items():\n"
        "    total += float(t[0, 0])\n"
        "    del t\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.split()[-1])
    assert grew < 80 * 2**20, f"peak RSS grew {grew / 2**20:.0f} MiB reading a 192 MiB checkpoint"
