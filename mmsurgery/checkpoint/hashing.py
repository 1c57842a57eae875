"""sha256 of input files, for provenance metadata — optionally in a background thread.

hashlib releases the GIL on large updates, so hashing a multi-GB input on the second core while the main
thread streams tensors costs almost no wall time; the writer patches the digest into the header at commit.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["HashJob", "Opener", "sha256_of"]

Opener = Callable[[Path], "int | None"]  # a descriptor on the file to hash (closed after), or None: open by path


def sha256_of(files: Sequence[Path], opener: Opener | None = None) -> str:
    """sha256 of one file, or of `name sha256` lines (sorted by name) for a sharded set. `opener` (e.g.
    `Checkpoint.open_pinned`) gives the descriptor to hash through, so the digest is of the file that was read."""
    digests = []
    for f in files:
        h = hashlib.sha256()
        fd = opener(Path(f)) if opener is not None else None
        if fd is None:
            fd = os.open(f, os.O_RDONLY)
        try:
            offset = 0
            while chunk := os.pread(fd, 1 << 20, offset):
                h.update(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)
        digests.append((Path(f).name, h.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in sorted(digests)).encode()).hexdigest()


class HashJob:
    """`sha256_of(files)` running in a daemon thread; `result()` waits for it."""

    def __init__(self, files: Sequence[Path], opener: Opener | None = None) -> None:
        self._result: str | None = None
        self._error: BaseException | None = None
        self._opener = opener
        self._thread = threading.Thread(target=self._run, args=(list(files),), daemon=True)
        self._thread.start()

    def _run(self, files: list[Path]) -> None:
        try:
            self._result = sha256_of(files, self._opener)
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
