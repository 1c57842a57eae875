"""Loader fuzzing (issue 10): mutated safetensors files, shard indexes and pickles end in one clean
`BadInputError` (CLI: one line, exit 2) or a correct read — never another exception, a hang or a memory blow-up.

A read is correct when it equals the reference reader's: `safetensors.torch.load_file` for safetensors files and
shards, `torch.load(weights_only=True)` without mmap for pickles. A file we read that the reference refuses fails
the test. `make test` runs `MMSURGERY_FUZZ_EXAMPLES` (default 100) examples per test, derandomized so CI is
reproducible; `make fuzz` runs 2,500 per test, freshly drawn each run (docs/formats.md has the counts and time).
What counts as a correct outcome lives in fuzz_oracle.py; the seeds and mutations in fuzz_inputs.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fuzz_inputs import (
    INDEX,
    OUTSIDE,
    SHARDS,
    Mutant,
    Raw,
    dump,
    index_mutants,
    join_safetensors,
    legacy_mutants,
    nest,
    safetensors_mutants,
    seed_legacy_pickle,
    seed_safetensors,
    seed_shards,
    seed_zip_pickle,
    split_safetensors,
    zip_mutants,
)
from fuzz_oracle import (
    assert_same,
    bounded,
    check_message,
    pickle_reference,
    read_all,
    safetensors_reference,
    shards_reference,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.cli import main
from mmsurgery.describe import describe
from mmsurgery.errors import BadInputError

FUZZING = "MMSURGERY_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("MMSURGERY_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not FUZZING,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
TEST_TIMEOUT = 120 + EXAMPLES  # seconds per test; every example also has EXAMPLE_SECONDS


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


def write(m: Mutant, work: Path) -> Path:
    """The mutant on disk; a sharded set gets a fresh folder, with `outside.safetensors` beside it."""
    if not m.files:
        path = work / f"model{m.suffix}"
        path.write_bytes(m.data)
        return path
    folder = work / "shards"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (work / OUTSIDE).write_bytes(seed_safetensors())
    for name, data in m.files.items():
        (folder / name).write_bytes(data.replace(b'"/OUTSIDE"', json.dumps(str(work / OUTSIDE)).encode()))
    return folder / INDEX


def check(m: Mutant, work: Path, reference: Callable[[Path], dict[str, torch.Tensor] | None]) -> None:
    path = write(m, work)
    with bounded():
        got = read_all(path)
        event("read" if isinstance(got, dict) else "refused: " + str(got).split(": ", 1)[-1][:40])
        if isinstance(got, dict):
            want = reference(path)
            assert want is not None, f"read a file the reference reader refuses ({len(got)} tensors)"
            assert_same(got, want)


# --- the seeds are valid, and read correctly ------------------------------------------------------------------


def test_seeds_read_correctly(work: Path) -> None:
    seeds = [
        (Mutant(seed_safetensors(), ()), safetensors_reference),
        (Mutant(b"", (), ".json", seed_shards()), shards_reference),
        (Mutant(seed_zip_pickle(), (), ".pt"), pickle_reference),
        (Mutant(seed_legacy_pickle(), (), ".pth"), pickle_reference),
    ]
    for m, reference in seeds:
        path = write(m, work)
        got = read_all(path)
        assert isinstance(got, dict) and len(got) == 20, got
        assert_same(got, reference(path))
        assert describe(path).default_stack is not None


# --- properties -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(TEST_TIMEOUT)
@FUZZ
@given(m=safetensors_mutants())
def test_safetensors_mutants(m: Mutant, work: Path) -> None:
    check(m, work, safetensors_reference)


@pytest.mark.timeout(TEST_TIMEOUT)
@FUZZ
@given(m=index_mutants())
def test_shard_index_mutants(m: Mutant, work: Path) -> None:
    check(m, work, shards_reference)


@pytest.mark.timeout(TEST_TIMEOUT)
@FUZZ
@given(m=zip_mutants())
def test_zip_pickle_mutants(m: Mutant, work: Path) -> None:
    check(m, work, pickle_reference)


@pytest.mark.timeout(TEST_TIMEOUT)
@FUZZ
@given(m=legacy_mutants())
def test_legacy_pickle_mutants(m: Mutant, work: Path) -> None:
    check(m, work, pickle_reference)


@pytest.mark.timeout(TEST_TIMEOUT)
@settings(FUZZ, max_examples=max(10, EXAMPLES // 2))
@given(m=st.one_of(safetensors_mutants(), index_mutants(), zip_mutants(), legacy_mutants()))
def test_cli_inspect_mutants(m: Mutant, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(m, work)
    capsys.readouterr()
    with bounded():
        code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    else:
        assert err == "" and out


# --- the inputs a tester reported, each by name ------------------------------------------------------------------

QKV = "blocks.0.attn.qkv.weight"  # [12, 4] float32: 192 bytes
SCALE = "blocks.0.attn.proj.cross_modal_scale"  # [1] float32


def safetensors_with(field: str, value: object, name: str = QKV) -> Mutant:
    header, body = split_safetensors(seed_safetensors())
    header[name][field] = value
    return Mutant(join_safetensors(dump(header), body), (f"{name}.{field} = {value!r:.40}",))


def _offsets(name: str, f) -> list[object]:
    begin, end = split_safetensors(seed_safetensors())[0][name]["data_offsets"]
    return [f(begin), f(end)]


def renamed(old: str, new: str) -> Mutant:
    header, body = split_safetensors(seed_safetensors())
    header = {new if k == old else k: v for k, v in header.items()}
    return Mutant(join_safetensors(dump(header), body), (f"rename {old}",))


def index_with(edit) -> Mutant:
    files = dict(seed_shards())
    index = json.loads(files[INDEX])
    edit(index["weight_map"])
    files[INDEX] = json.dumps(index).encode()
    return Mutant(files[INDEX], ("index edit",), ".json", files)


def zip_with(edit) -> Mutant:
    raw = bytearray(seed_zip_pickle())
    edit(raw, zipfile.ZipFile(io.BytesIO(bytes(raw))))
    return Mutant(bytes(raw), ("zip edit",), ".pt")


def _flip(at, bit: int = 0xFF):
    def edit(raw: bytearray, z: zipfile.ZipFile) -> None:
        raw[at(z)] ^= bit

    return edit


def _cut_record(raw: bytearray, z: zipfile.ZipFile) -> None:
    """data/0 truncated to 4 of its bytes, the zip rebuilt around it (sizes and CRCs consistent)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in z.infolist():
            data = z.read(info)
            dst.writestr(info, data[:4] if info.filename.endswith("/data/0") else data)
    raw[:] = out.getvalue()


def _legacy_protocol_3() -> Mutant:
    buf = io.BytesIO()
    torch.save({"not_blocks": torch.ones(2)}, buf, _use_new_zipfile_serialization=False, pickle_protocol=3)
    return Mutant(buf.getvalue(), ("protocol 3",), ".pth")


def _unlisted(wm: dict[str, object]) -> None:
    del wm["mask"]


REPORTED: dict[str, tuple[object, str]] = {
    "header-nested-100000-deep": (lambda: safetensors_with("shape", nest(100_000, 1, "[")), "nested|malformed"),
    "offset-1e400": (lambda: safetensors_with("data_offsets", [0, Raw("1e400")]), "data_offsets"),
    "offset-Infinity": (lambda: safetensors_with("data_offsets", [Raw("Infinity"), 192]), "Infinity|not JSON"),
    "shape-NaN": (lambda: safetensors_with("shape", [Raw("NaN"), 4]), "NaN|not JSON"),
    "shape-5000-digits": (lambda: safetensors_with("shape", [Raw("9" * 5000), 4]), "digits|integer"),
    "offsets-as-strings": (lambda: safetensors_with("data_offsets", _offsets(QKV, str)), "data_offsets"),
    "offsets-as-floats": (lambda: safetensors_with("data_offsets", _offsets(QKV, float)), "data_offsets"),
    "shape-as-bool": (lambda: safetensors_with("shape", [True], SCALE), "shape"),
    "shape-as-string": (lambda: safetensors_with("shape", ["12", "4"]), "shape"),
    "shape-overflow": (lambda: safetensors_with("shape", [2**62, 2**62]), "overflow|does not fit|bytes"),
    "shape-10^18-elements": (lambda: safetensors_with("shape", [10**18]), "bytes"),
    "shape-overflow-many-dims": (lambda: safetensors_with("shape", [2**62] * 100_000), "dimensions"),
    "shape-zero-and-2**63": (lambda: safetensors_with("shape", [0, 2**63], "empty"), "shape"),
    "empty-shape-whose-strides-overflow": (lambda: safetensors_with("shape", [0, 2, 2**62], "empty"), "overflows"),
    "offset-minus-zero": (lambda: safetensors_with("data_offsets", [Raw("-0"), 0], "empty"), "data_offsets"),
    "extra-field-lone-surrogate": (lambda: safetensors_with("x", Raw('"\\ud800"')), "surrogate"),
    "dtype-as-list": (lambda: safetensors_with("dtype", ["F32"]), "dtype"),
    "weight_map-null": (lambda: index_with(lambda wm: wm.update(mask=None)), "weight_map"),
    "weight_map-number": (lambda: index_with(lambda wm: wm.update(mask=3)), "weight_map"),
    "weight_map-list": (lambda: index_with(lambda wm: wm.update(mask=[SHARDS[1]])), "weight_map"),
    "weight_map-dotdot": (lambda: index_with(lambda wm: wm.update(mask=f"../{OUTSIDE}")), "outside"),
    "weight_map-absolute": (lambda: index_with(lambda wm: wm.update(mask="/OUTSIDE")), "outside|absolute"),
    "tensor-not-in-weight_map": (lambda: index_with(_unlisted), "'mask'"),
    "zip-directory-bad-magic": (lambda: zip_with(_flip(lambda z: z.start_dir)), "PyTorch checkpoint"),
    "zip-directory-bad-utf8-name": (lambda: zip_with(_flip(lambda z: z.start_dir + 46, 0x80)), "PyTorch checkpoint"),
    "zip-record-truncated": (lambda: zip_with(_cut_record), "data/0"),
}


@pytest.mark.parametrize("name", list(REPORTED))
def test_reported_inputs_are_refused_in_one_line(name: str, work: Path) -> None:
    make, pattern = REPORTED[name]
    path = write(make(), work)
    with bounded(), pytest.raises(BadInputError, match=pattern) as e, open_checkpoint(path) as ck:
        for n in ck:
            ck.get(n)
    check_message(e.value)


def test_huge_block_index_is_not_a_block(work: Path) -> None:
    """`blocks.<5000 digits>.…` is a name like any other: read, and describe does not crash on it."""
    path = write(renamed(QKV, "blocks." + "9" * 5000 + ".attn.qkv.weight"), work)
    assert isinstance(read_all(path), dict)


def test_torch_warnings_do_not_reach_stderr(work: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(_legacy_protocol_3(), work)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["inspect", str(path)]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "name",
    [
        "header-nested-100000-deep",
        "offset-1e400",
        "dtype-as-list",
        "zip-directory-bad-utf8-name",
        "zip-record-truncated",
    ],
)
def test_console_script_one_line_exit_2(name: str, work: Path) -> None:
    path = write(REPORTED[name][0](), work)
    r = subprocess.run(
        [sys.executable, "-m", "mmsurgery", "inspect", str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr


def test_console_script_protocol_3_pickle_stays_one_line(work: Path) -> None:
    path = write(_legacy_protocol_3(), work)
    r = subprocess.run(
        [sys.executable, "-m", "mmsurgery", "inspect", str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr


def test_torchscript_archive_is_still_refused_by_name(work: Path) -> None:
    """The TorchScript check moved inside the guarded load: it must still name the problem."""
    path = work / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(BadInputError, match="TorchScript archive"):
        open_checkpoint(path)


def test_pickle_shard_with_an_unlisted_tensor_is_refused(work: Path) -> None:
    """The shard checks hold for `pytorch_model.bin` sets too: no tensor is silently dropped or merged."""
    torch.save({"a.weight": torch.ones(2), "extra": torch.zeros(1)}, work / "pytorch_model-00001-of-00001.bin")
    index = {"weight_map": {"a.weight": "pytorch_model-00001-of-00001.bin"}}
    (work / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(BadInputError, match=r"'extra' is in .* but not in the index") as e:
        open_checkpoint(work)
    check_message(e.value)
