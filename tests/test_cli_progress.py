"""The progress bar of `pair` and `fold`, where a user sees it: the console script with stderr on a pseudo-terminal
(drawn), on a pipe (a CI log: never drawn) and under `--quiet` (never drawn). stdout stays the result alone."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmsurgery.render import PROGRESS_MIN_BYTES

SCRIPT = Path(sys.executable).with_name("mmsurgery")
BAR = "━"  # rich's bar glyph


def _big_paired(path: Path) -> Path:
    """A paired file whose fold writes more than PROGRESS_MIN_BYTES (5 float32 2048×2048 layers: 84 MB out)."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(5):
        state[f"blocks.{i}.fc.weight"] = torch.randn(2048, 2048, generator=g)
        state[f"blocks.{i}.fc.aux_weight"] = torch.randn(2048, 2048, generator=g)
        state[f"blocks.{i}.fc.cross_modal_scale"] = torch.full((1,), 0.5)
    assert PROGRESS_MIN_BYTES < 5 * 2048 * 2048 * 4
    save_file(state, path)
    return path


def _run(args: list[str], *, tty: bool) -> tuple[int, str, str]:
    """Run the console script; stderr on a pseudo-terminal when `tty`. Returns (code, stdout, stderr)."""
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    if not tty:
        r = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)
        return r.returncode, r.stdout, r.stderr
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = proc.stdout.read().decode() if proc.stdout else ""
        code = proc.wait(timeout=120)
    finally:
        os.close(master)
    return code, out, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _big_paired(tmp_path_factory.mktemp("progress") / "big.paired.safetensors")


@pytest.mark.slow
def test_fold_draws_a_progress_bar_on_a_terminal_only(big: Path, tmp_path: Path) -> None:
    code, out, err = _run(["fold", str(big), "-o", str(tmp_path / "a.safetensors")], tty=True)
    assert code == 0, err
    assert BAR in err and "fold" in err and "MB" in err, err[-500:]
    assert BAR not in out  # the bar is on stderr; stdout keeps the result alone

    code, out, err = _run(["fold", str(big), "-o", str(tmp_path / "b.safetensors")], tty=False)
    assert code == 0, err
    assert err == ""  # a pipe (a CI log) gets no bar and no escape codes

    code, out, err = _run(["fold", str(big), "-o", str(tmp_path / "c.safetensors"), "--quiet"], tty=True)
    assert code == 0, err
    assert BAR not in err, err[-500:]


def test_small_jobs_draw_no_bar(tmp_path: Path) -> None:
    state = {
        "b.fc.weight": torch.ones(4, 4),
        "b.fc.aux_weight": torch.ones(4, 4),
        "b.fc.cross_modal_scale": torch.ones(1),
    }
    save_file(state, tmp_path / "small.safetensors")
    code, _out, err = _run(
        ["fold", str(tmp_path / "small.safetensors"), "-o", str(tmp_path / "o.safetensors")], tty=True
    )
    assert code == 0, err
    assert BAR not in err
