"""One exception family. The CLI turns each into one line on stderr and its exit code.

`BadInputError` (exit 2) means the input or the usage is wrong; `CheckFailedError` (exit 1) means the input was
fine but a check it was put to failed. Messages say what is wrong and, where there is one, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AttachError",
    "BadInputError",
    "CheckFailedError",
    "FoldError",
    "MMSurgeryError",
    "NoTransformerBlocksError",
    "OutputExistsError",
    "PairingError",
    "UnsafeCheckpointError",
    "one_line",
]


class MMSurgeryError(Exception):
    """Base of every error mmsurgery raises on purpose."""

    exit_code = 2


class BadInputError(MMSurgeryError):
    """A missing, unreadable, corrupt, unsafe or unsuitable input, or a refused output path."""

    exit_code = 2


class UnsafeCheckpointError(BadInputError):
    """A pickle that needs a global outside the allow-list; it is never unpickled."""


class NoTransformerBlocksError(BadInputError):
    """A checkpoint that holds tensors but no transformer block stack."""


class OutputExistsError(BadInputError):
    """The output exists (and `force` was not given) or would overwrite an input."""


class PairingError(BadInputError):
    """Two checkpoints that cannot be paired as asked."""


class AttachError(BadInputError):
    """A model whose modules or weights do not match a paired checkpoint."""


class FoldError(BadInputError):
    """A paired checkpoint that cannot be folded (a non-finite λ or folded weight, a missing tensor)."""


class CheckFailedError(MMSurgeryError):
    """A verification check ran and failed."""

    exit_code = 1


def one_line(text: str) -> str:
    """`text` (a message of another library, which may span lines) as one line: its non-blank lines, stripped,
    joined by "; " (by a space after a line that ends a sentence). The CLI prints every error as one line, and a
    line break left in a message would show there as a literal `\\n`."""
    out = ""
    for line in (s.strip() for s in text.splitlines()):
        if line:
            out += ("" if not out else " " if out[-1] in ".:;!?" else "; ") + line
    return out
