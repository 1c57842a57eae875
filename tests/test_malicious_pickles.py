"""A corpus of hostile pickles: every way a pickle can name a callable (GLOBAL, STACK_GLOBAL with its strings from
the memo, INST, OBJ, NEWOBJ, REDUCE nested in containers), each as a raw pickle, a legacy torch.save stream and
the `data.pkl` of a torch zip. Loading must refuse each without running it, name the global the pickle really
references, and never pass on torch's advice to retry with `weights_only=False`.

The corpus is checked to be live: the plain `pickle` module runs each payload and leaves the marker file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.cli import main
from mmsurgery.errors import BadInputError, UnsafeCheckpointError


def _unicode(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


class _Call:
    """Pickles as `func(*args)` (REDUCE); `func` is whatever the test names."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, ...]:
        return self.func, self.args


def _touch(marker: Path) -> str:
    return f"touch {marker}"


def _exec_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# Each case: marker -> (pickle bytes, the global(s) it really references, whether running it leaves the marker).
def global_reduce_nested(m: Path) -> tuple[bytes, set[str], bool]:
    data = pickle.dumps({"w": [1, {"deep": _Call(os.system, _touch(m))}]}, protocol=2)  # GLOBAL posix system
    return data, {f"{os.system.__module__}.system"}, True


def stack_global_memoize(m: Path) -> tuple[bytes, set[str], bool]:
    data = pickle.dumps({"a": (_Call(exec, _exec_code(m)),)}, protocol=4)  # STACK_GLOBAL + MEMOIZE
    return data, {"builtins.exec"}, True


def stack_global_from_memo(m: Path) -> tuple[bytes, set[str], bool]:
    """The module and name are memoised, popped, and fetched back by BINGET after a harmless global was built from
    two other strings: the last two strings in the stream name the decoy, not what runs."""
    data = (
        b"\x80\x04"
        + _unicode("os")
        + b"\x94"  # MEMOIZE 0
        + _unicode("system")
        + b"\x94"  # MEMOIZE 1
        + b"00"  # POP POP
        + _unicode("collections")
        + _unicode("OrderedDict")
        + b"\x93"  # STACK_GLOBAL collections.OrderedDict (allowed)
        + b"0"
        + b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL -> os.system
        + _unicode(_touch(m))
        + b"\x85R."  # TUPLE1 REDUCE STOP
    )
    return data, {"os.system"}, True


def stack_global_long_put(m: Path) -> tuple[bytes, set[str], bool]:
    """Protocol 3 style: LONG_BINPUT / LONG_BINGET at large memo indexes, a list in between."""
    data = (
        b"\x80\x03]("  # EMPTY_LIST MARK
        + _unicode("builtins")
        + b"r\x00\x10\x00\x00"  # LONG_BINPUT 4096
        + _unicode("exec")
        + b"r\x01\x10\x00\x00"  # LONG_BINPUT 4097
        + b"e"  # APPENDS
        + b"j\x00\x10\x00\x00j\x01\x10\x00\x00\x93"  # LONG_BINGET 4096, LONG_BINGET 4097, STACK_GLOBAL
        + _unicode(_exec_code(m))
        + b"\x85Ra."  # TUPLE1 REDUCE APPEND STOP
    )
    return data, {"builtins.exec"}, True


def inst_protocol_0(m: Path) -> tuple[bytes, set[str], bool]:
    return f"(V{_touch(m)}\nios\nsystem\np0\n.".encode(), {"os.system"}, True  # MARK UNICODE INST PUT STOP


def obj_protocol_1(m: Path) -> tuple[bytes, set[str], bool]:
    raw = _touch(m).encode()
    data = b"(cos\nsystem\nX" + struct.pack("<I", len(raw)) + raw + b"o."  # MARK GLOBAL BINUNICODE OBJ STOP
    return data, {"os.system"}, True


def newobj(m: Path) -> tuple[bytes, set[str], bool]:
    """NEWOBJ of a class torch does not allow, its argument a REDUCE call: two globals, one of which runs."""
    data = (
        b"\x80\x02csubprocess\nPopen\n"  # GLOBAL subprocess Popen
        + b"cposix\nsystem\n"
        + _unicode(_touch(m))
        + b"\x85R\x85\x81."  # TUPLE1 REDUCE TUPLE1 NEWOBJ STOP
    )
    return data, {"subprocess.Popen", "posix.system"}, True


CASES = {
    f.__name__: f
    for f in (
        global_reduce_nested,
        stack_global_memoize,
        stack_global_from_memo,
        stack_global_long_put,
        inst_protocol_0,
        obj_protocol_1,
        newobj,
    )
}


def as_raw_pickle(payload: bytes, path: Path) -> Path:
    path = path.with_suffix(".pt")
    path.write_bytes(payload)
    return path


def as_legacy_torch(payload: bytes, path: Path) -> Path:
    """The legacy torch.save layout: magic number, protocol, sys info, then the object (here: the payload)."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, sys_info))
    path = path.with_suffix(".pth")
    path.write_bytes(head + payload)
    return path


def as_torch_zip(payload: bytes, path: Path) -> Path:
    """A valid torch.save zip whose `data.pkl` is replaced by the payload."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, payload if info.filename.endswith("/data.pkl") else src.read(info.filename))
    path = path.with_suffix(".bin")
    path.write_bytes(out.getvalue())
    return path


CONTAINERS = {"raw": as_raw_pickle, "legacy-torch": as_legacy_torch, "zip": as_torch_zip}


def named(message: str) -> set[str]:
    found = re.search(r"unsafe global\(s\) (.*?); only", message)
    assert found, message
    return set(found.group(1).split(", "))


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("case", list(CASES))
def test_malicious_pickle_is_refused_unexecuted_and_named(tmp_path: Path, case: str, container: str) -> None:
    marker = tmp_path / "MARKER"
    payload, real, _ = CASES[case](marker)
    path = CONTAINERS[container](payload, tmp_path / "evil")
    with pytest.raises(UnsafeCheckpointError) as e:
        open_checkpoint(path)
    message = str(e.value)
    assert not marker.exists(), "the payload ran"
    assert named(message) == real, message
    assert "weights_only=False" not in message and "\n" not in message


@pytest.mark.parametrize("case", list(CASES))
def test_the_corpus_is_live(tmp_path: Path, case: str) -> None:
    """Unpickled without restriction, each payload leaves its marker: the refusals above are not vacuous."""
    marker = tmp_path / "MARKER"
    payload, _, leaves_trace = CASES[case](marker)
    assert leaves_trace
    pickle.loads(payload)
    assert marker.exists()


def test_cli_names_the_memoised_global_in_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "MARKER"
    path = as_torch_zip(stack_global_from_memo(marker)[0], tmp_path / "evil")
    assert main(["inspect", str(path)]) == 2
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and "os.system" in err and "weights_only=False" not in err, err
    assert not marker.exists()


def test_torch_refusal_never_passes_on_the_retry_advice(tmp_path: Path) -> None:
    """A refusal that names no unsafe global (a protocol-4 pickle of allowed names torch's unpickler cannot read)
    keeps torch's reason, not its advice."""
    data = b"\x80\x04" + _unicode("collections") + _unicode("OrderedDict") + b"\x93)R."
    path = as_torch_zip(data, tmp_path / "odd")
    with pytest.raises(BadInputError) as e:
        open_checkpoint(path)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value), str(e.value)
