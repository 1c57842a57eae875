"""Shell completion, as a shell runs it: the installed console script with the environment variables the
completion script sets (bash: `_MMSURGERY_COMPLETE=complete_bash`, `COMP_WORDS`, `COMP_CWORD`; zsh:
`_TYPER_COMPLETE_ARGS`). Nothing is installed into the user's shell rc: `--show-completion` prints the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("mmsurgery")


def _complete(words: str, cword: int, shell: str = "bash") -> list[str]:
    env = {**os.environ, "_MMSURGERY_COMPLETE": f"complete_{shell}"}
    if shell == "bash":
        # the bash script joins the words with newlines (`local IFS=$'\n'`); a trailing "" is the word being typed
        env |= {"COMP_WORDS": "\n".join(words.split(" ")), "COMP_CWORD": str(cword)}
    else:
        env["_TYPER_COMPLETE_ARGS"] = words
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_show_completion_prints_a_bash_script() -> None:
    """The shell is detected from the parent process (shellingham), as when a user types it in bash."""
    cmd = ["bash", "-c", f"'{SCRIPT}' --show-completion; exit $?"]  # not exec'd: bash stays the parent
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "_mmsurgery_completion" in r.stdout and "complete_bash" in r.stdout


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("mmsurgery fo", 1, ["fold"]),
        ("mmsurgery ", 1, ["inspect", "pair", "fold", "verify"]),
        ("mmsurgery fold x.safetensors --dt", 3, ["--dtype"]),
        ("mmsurgery fold x.safetensors --dtype b", 4, ["bfloat16"]),
        ("mmsurgery fold x.safetensors --dtype f", 4, ["float32", "float16"]),
        ("mmsurgery pair a b --depth ", 5, ["stretch", "first", "last", "index"]),
    ],
)
def test_bash_completes_commands_options_and_values(words: str, cword: int, expected: list[str]) -> None:
    assert _complete(words, cword) == expected


def test_zsh_completes_option_values() -> None:
    out = " ".join(_complete("mmsurgery fold x --dtype ", 0, shell="zsh"))
    for value in ("keep", "float32", "bfloat16", "float16"):
        assert f'"{value}"' in out
