"""What a correct outcome of a fuzz example is (tests/test_fuzz.py): one clean `BadInputError`, or a read equal
to a reference reader's, within a time and memory bound."""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import signal
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import psutil
import torch
from fuzz_inputs import data_start
from safetensors.torch import load_file

from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.checkpoint.normalize import strip_prefixes, unwrap
from mmsurgery.describe import describe
from mmsurgery.errors import BadInputError

EXAMPLE_SECONDS = 10
MEMORY_HEADROOM = 2 << 30  # address space an example may add: a 10^18-element header must never be allocated
READS_FLOATS = {"float16", "bfloat16", "float32", "float64"}


class Hang(Exception):
    pass


@contextmanager
def bounded() -> Iterator[None]:
    """Fail an example that runs over EXAMPLE_SECONDS or maps more than MEMORY_HEADROOM of new memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def alarm(*_: object) -> None:
        raise Hang(f"example ran over {EXAMPLE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, EXAMPLE_SECONDS)  # pytest-timeout's own alarm, if armed
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.01))
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_message(e: BadInputError) -> None:
    text = str(e)
    assert text and "\n" not in text and "\r" not in text and len(text) < 800, repr(text)
    assert not any(w in text for w in ("allocate", "out of memory", "MemoryError")), f"tried to allocate: {text}"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert (got[k].dtype, tuple(got[k].shape)) == (t.dtype, tuple(t.shape)), k
        assert torch.equal(as_bytes(got[k]), as_bytes(t)), k


def read_all(path: Path) -> dict[str, torch.Tensor] | BadInputError:
    """Everything the loader offers for `path`: each tensor, the values of small float tensors, `describe`."""
    try:
        with open_checkpoint(path) as ck:
            got = {name: ck.get(name) for name in ck}
            for name, info in ck.infos.items():
                t = got[name]
                assert (t.dtype, tuple(t.shape)) == (getattr(torch, info.dtype), info.shape), name
                if info.dtype in READS_FLOATS and info.numel <= 64:
                    values, want = ck.read_floats(name), t.double().reshape(-1).tolist()
                    assert len(values) == len(want), name
                    assert all(
                        a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(values, want, strict=True)
                    ), name
    except BadInputError as e:
        check_message(e)
        return e
    try:
        describe(path)
    except BadInputError as e:  # no blocks, an inconsistent pathway: the tensors were still read
        check_message(e)
    return got


def safetensors_reference(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return strip_prefixes(load_file(path))
    except Exception:
        return None


def shards_reference(index: Path) -> dict[str, torch.Tensor] | None:
    """The sharded set as the format defines it: every weight_map value a shard inside the folder, every tensor
    of every shard listed, and listed in the shard that holds it."""
    try:
        wm = json.loads(index.read_text(), parse_constant=float)["weight_map"]
        assert isinstance(wm, dict) and wm and all(isinstance(v, str) for v in wm.values())
        shards = {k: PurePosixPath(v) for k, v in wm.items()}  # `./x` and `x` name the same shard
        out: dict[str, torch.Tensor] = {}
        for p in set(shards.values()):
            assert p.parts and not p.is_absolute() and ".." not in p.parts and "\x00" not in str(p)
            for k, t in load_file(index.parent / p).items():
                assert shards.get(k) == p
                out[k] = t
        assert set(out) == set(wm)
        return strip_prefixes(out)
    except Exception:
        return None


def pickle_reference(path: Path) -> dict[str, torch.Tensor] | None:
    """`torch.load` without mmap; a zip is first rebuilt from its members' bytes as Python's zipfile finds them,
    a second opinion on torch's own zip reader (which reads a member whose attributes say "directory" as empty,
    handing back uninitialised memory)."""
    try:
        data = path.read_bytes()
        source = io.BytesIO(rezip(data)) if data[:4] == b"PK\x03\x04" else path
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")
            obj = torch.load(source, map_location="cpu", weights_only=True)
        return strip_prefixes(unwrap(obj).tensors)
    except Exception:
        return None


def rezip(data: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            start = data_start(data, info)
            stored = data[start : start + info.compress_size]  # CRCs are not checked: torch does not either
            dst.writestr(info.filename, stored if info.compress_type == zipfile.ZIP_STORED else src.read(info))
    return out.getvalue()
