"""The CLI's error boundary: every refusal is exit 2 with exactly one line on stderr, whatever the message quotes
(terminal escapes, newlines, lone surrogates), whatever the operating system refuses (a name too long, a path
through a file, no permission), and exit 3 stays for real bugs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pathway_fixtures import make_paired_state, tiny_vit
from rich.console import Console
from safetensors.torch import save_file

from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.cli import main
from mmsurgery.errors import BadInputError
from mmsurgery.render import escape_controls, print_error
from mmsurgery.verify.report import Report, check_output_path

HOSTILE = "blk\x1b[2J\x1b]0;pwned\x07\r\nX\ud800\u202e\x85"  # clear screen, set title, CR LF, surrogate, bidi, NEL
RAW_CONTROLS = ("\x1b", "\r", "\x07", "\x85", "\u202e")


def one_clean_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), repr(err)
    assert not any(c in err for c in RAW_CONTROLS), repr(err)
    assert "Traceback" not in err
    return lines[0]


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmsurgery", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def hostile_pickle(path: Path) -> Path:
    """A pickle whose only tensor name holds escapes and a lone surrogate: `inspect` quotes it in its refusal."""
    torch.save({HOSTILE: torch.zeros(2)}, path)
    return path


def paired_with_scale_shape(path: Path, shape: tuple[int, ...]) -> Path:
    sd = make_paired_state(tiny_vit(0))
    for k in sd:
        if k.endswith("cross_modal_scale"):
            sd[k] = torch.full(shape, 0.5)
    save_file(sd, path)
    return path


# --- the real console entry, in a subprocess -----------------------------------------------------------------


def test_console_hostile_file_name_is_escaped_in_one_line(tmp_path: Path) -> None:
    """An undecodable byte (a lone surrogate once decoded), ESC sequences and CR LF in the name of a missing file."""
    name = os.fsencode(tmp_path) + b"/\xff\x1b[31m\r\nred.safetensors"
    r = subprocess.run([sys.executable, "-m", "mmsurgery", "inspect", name], capture_output=True, timeout=60)
    assert r.returncode == 2, r.stderr
    line = one_clean_line(r.stderr.decode("utf-8", "surrogateescape"))
    assert "\\udcff\\x1b[31m\\r\\nred.safetensors: no such file" in line, line


def test_console_name_too_long_is_no_such_file(tmp_path: Path) -> None:
    r = run_cli("inspect", tmp_path / ("a" * 300 + ".safetensors"))
    assert r.returncode == 2, r.stderr
    assert "no such file" in one_clean_line(r.stderr)


def test_console_verify_report_under_a_file_is_refused_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = run_cli("verify", tmp_path / "missing.safetensors", "--json", tmp_path / "file" / "r.json")
    assert r.returncode == 2, r.stderr
    assert "is a file, not a folder" in one_clean_line(r.stderr)  # not the missing PLAIN: nothing ran


# --- in process ------------------------------------------------------------------------------------------------


def test_escape_controls_keeps_text_and_escapes_only_controls() -> None:
    assert escape_controls("λ héllo · 日本") == "λ héllo · 日本"
    assert escape_controls(HOSTILE) == "blk\\x1b[2J\\x1b]0;pwned\\x07\\r\\nX\\ud800\\u202e\\x85"


def test_print_error_is_one_line_even_on_a_strict_encoder(tmp_path: Path) -> None:
    with (tmp_path / "err.txt").open("w", encoding="utf-8", errors="strict") as f:
        print_error(Console(file=f, soft_wrap=True), f"tensor {HOSTILE!s}: refused")
    one_clean_line((tmp_path / "err.txt").read_text())


def test_main_escapes_a_surrogate_on_captured_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pytest's capture encodes strictly: the lone surrogate crashed the printer (exit 3, two lines)."""
    assert main(["inspect", str(hostile_pickle(tmp_path / "h.pt"))]) == 2
    one_clean_line(capsys.readouterr().err)


def test_internal_error_is_escaped_and_stays_exit_3(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise ValueError(f"a bug quoting {HOSTILE}")

    monkeypatch.setattr("mmsurgery.describe.describe", bug)
    assert main(["inspect", "x.safetensors"]) == 3
    assert one_clean_line(capsys.readouterr().err).startswith("internal error: ValueError")


def test_os_refusal_escaping_a_command_is_exit_2(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/data/m.safetensors")

    monkeypatch.setattr("mmsurgery.describe.describe", refused)
    assert main(["inspect", "m.safetensors"]) == 2
    assert one_clean_line(capsys.readouterr().err) == "error: /data/m.safetensors: Permission denied"


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5)])
def test_misshapen_lambda_is_refused_by_inspect_and_fold(tmp_path: Path, shape, cli) -> None:
    """λ [1, 1, 1] broadcast W + λ·W_aux to [1, out, in] in fold: the writer caught the shape as an internal error
    (exit 3). `inspect` read its one value; both now refuse it by the format's rule (`paired_format.scale_problem`):
    one value ([1] or []), or W's rank with sizes dividing W's — 5 divides none of the tiny ViT's 32/96/128."""
    path = paired_with_scale_shape(tmp_path / "p.safetensors", shape)
    for args in (["inspect", path], ["fold", path, "-o", tmp_path / "o.safetensors"]):
        r = cli(*args)
        assert r.code == 2 and f"shape {list(shape)}" in one_clean_line(r.err), r.err
    assert not (tmp_path / "o.safetensors").exists()


def test_lambda_of_shape_0d_folds_like_shape_1(tmp_path: Path, cli) -> None:
    for shape in ((), (1,)):
        path = paired_with_scale_shape(tmp_path / f"p{len(shape)}.safetensors", shape)
        r = cli("fold", path, "-o", tmp_path / f"o{len(shape)}.safetensors")
        assert r.code == 0, r.err
    with open_checkpoint(tmp_path / "o0.safetensors") as a, open_checkpoint(tmp_path / "o1.safetensors") as b:
        assert all(torch.equal(a.get(n), b.get(n)) for n in a)


def test_input_path_refusals_are_bad_input(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(BadInputError, match=r"no such file or folder \(name too long\)"):
        open_checkpoint(tmp_path / ("a" * 300 + ".safetensors"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="no such file"):
        open_checkpoint(tmp_path / "file" / "m.safetensors")
    with pytest.raises(BadInputError, match="NUL character"):
        open_checkpoint(tmp_path / "a\x00b.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    real_open = os.open

    def no_permission(path, *args, **kwargs):  # tests run as root: chmod would not refuse
        if str(path).endswith("m.safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    with pytest.raises(BadInputError, match=r"m\.safetensors: cannot read \(Permission denied\)"):
        open_checkpoint(tmp_path / "m.safetensors")


def test_check_output_path_refuses_what_cannot_be_written(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "r.json")
    with pytest.raises(BadInputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "r.json")
    with pytest.raises(BadInputError, match="is a folder"):
        check_output_path(tmp_path)
    with pytest.raises(BadInputError, match="not a usable report path"):
        check_output_path(tmp_path / ("a" * 300) / "r.json")
    check_output_path(tmp_path / "r.json")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # root may write anywhere: simulate a read-only folder
    with pytest.raises(BadInputError, match="is not writable"):
        check_output_path(tmp_path / "r.json")


def test_report_write_failing_after_the_run_is_exit_2(tmp_path: Path, monkeypatch, cli) -> None:
    """The folder was fine at the check and went away during the run: one line naming the path, not exit 3; the
    table was already printed, so the run's result is not lost."""
    report = Report(stages=(), inputs={"plain": "p.safetensors"}, tolerances={}, versions={}, seconds=0.0)
    monkeypatch.setattr("mmsurgery.verify.verify", lambda *a, **k: report)

    def vanished(self: Report, path: Path) -> Path:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr(Report, "write_json", vanished)
    r = cli("verify", "p.safetensors", "--json", tmp_path / "r.json")
    assert r.code == 2 and "PASSED" in r.out, (r.out, r.err)
    assert one_clean_line(r.err) == f"error: {tmp_path / 'r.json'}: cannot write the report (No such file or directory)"


def test_pair_refuses_a_non_finite_init_scale(tmp_path) -> None:
    """`pair --init-scale nan` used to exit 0 and write a file `fold` then refused."""
    from test_pair import timm_vit

    save_file(timm_vit(), tmp_path / "t.safetensors")
    save_file(timm_vit(seed=1), tmp_path / "a.safetensors")
    for value in ("nan", "inf", "-inf"):
        r = subprocess.run(
            [sys.executable, "-m", "mmsurgery", "pair", "t.safetensors", "a.safetensors", "--init-scale", value],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and "--init-scale" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "t.safetensors"]


def test_tensor_names_with_terminal_escapes_are_escaped_in_inspect_tables(tmp_path) -> None:
    """A block-stack prefix holding ESC [2J (clear screen) and a C1 CSI reaches the table escaped, never raw."""
    from test_pair import timm_vit

    hostile = "\x1b[2J\x9b31m"
    sd = {f"{hostile}.{k}": v for k, v in timm_vit().items()}
    save_file(sd, tmp_path / "h.safetensors")
    r = subprocess.run(
        [sys.executable, "-m", "mmsurgery", "inspect", str(tmp_path / "h.safetensors")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x9b" not in r.stdout
    assert "\\x1b[2J\\x9b31m" in r.stdout
