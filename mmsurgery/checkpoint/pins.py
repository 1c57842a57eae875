"""Pinned descriptors: a checkpoint reads the very files it described, from open to close.

`Pins` keeps one descriptor per file; size and mtime from `fstat` at open are checked before and after every
read, so a file replaced underneath (a new inode, by rename) is never seen and one rewritten in place is refused.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mmsurgery.checkpoint.safetensors_header import SafetensorsHeader, read_header
from mmsurgery.errors import BadInputError

__all__ = ["Pin", "Pins", "check_regular", "not_regular", "os_error", "pread_into"]


@dataclass(frozen=True)
class Pin:
    """An open file and what `fstat` said of it when its header was read."""

    fd: int
    size: int
    mtime_ns: int


class Pins:
    """The descriptors a safetensors checkpoint reads through, one per file, opened when the checkpoint is.

    A Checkpoint must read the file it described: `fold --force` or a training job may replace the file (a new
    inode, by rename) while a long command streams it, and a later `open()` by path would read the new file's
    bytes at the old header's offsets. Through the pinned descriptor a replaced file is never seen; a file
    rewritten or truncated in place (same inode) is caught by its size or mtime differing from what `fstat` said
    at open, checked before and after every read, and refused as "changed while being read".
    """

    def __init__(self) -> None:
        self._pins: dict[Path, Pin] = {}

    def open(self, path: Path) -> SafetensorsHeader:
        """Open `path`, read and validate its header, and keep the descriptor; the header is the descriptor's."""
        check_regular(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # replaced by a FIFO since: do not block
        except OSError as e:
            raise os_error(path, e) from None
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise not_regular(path, before.st_mode)
            header = read_header(path, fd)
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise BadInputError(f"{path}: changed while being read (replaced or rewritten as it was opened)")
        except OSError as e:
            os.close(fd)
            raise os_error(path, e) from None
        except BaseException:
            os.close(fd)
            raise
        self._pins[path] = Pin(fd, before.st_size, before.st_mtime_ns)
        return header

    def check(self, path: Path) -> Pin:
        """The pin of `path`, after proving the file still has the size and mtime it had when opened."""
        pin = self._pins.get(path)
        if pin is None:
            raise ValueError(f"{path}: read after the checkpoint was closed")
        st = os.fstat(pin.fd)
        if st.st_size != pin.size or st.st_mtime_ns != pin.mtime_ns:
            how = f"now {st.st_size} bytes, was {pin.size}" if st.st_size != pin.size else "rewritten in place"
            raise BadInputError(
                f"{path}: changed while being read ({how}); read it again once whatever writes it has finished"
            )
        return pin

    def size(self, path: Path) -> int | None:
        pin = self._pins.get(path)
        return None if pin is None else pin.size

    def dup(self, path: Path) -> int | None:
        pin = self._pins.get(path)
        return None if pin is None else os.dup(pin.fd)

    def close(self) -> None:
        pins, self._pins = self._pins, {}
        for pin in pins.values():
            os.close(pin.fd)


def check_regular(path: Path) -> None:
    """Refuse `path` unless it is a regular file (through symlinks), before anything opens it: opening a FIFO for
    reading blocks until a writer appears (forever, for a stray one), and opening a device may have effects of its
    own. Every file a reader opens passes here first (safetensors, pickles, indexes, DCP files, a model folder's)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise os_error(path, e) from None
    except ValueError:  # a NUL in the name: no file can have it
        raise BadInputError(f"{_brief_path(path)}: no such file or folder (a NUL character in the name)") from None
    if not stat.S_ISREG(mode):
        raise not_regular(path, mode)


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def not_regular(path: Path, mode: int) -> BadInputError:
    """One line naming `path` and what it is instead of a regular file."""
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return BadInputError(
        f"{_brief_path(path)}: {kind}, not a regular file; mmsurgery reads only regular files (save or copy it to one)"
    )


def os_error(path: Path, e: OSError) -> BadInputError:
    """An operating-system refusal as one line naming the file: ENAMETOOLONG reads as "no such file" (no file can
    have that name), too many shards for the descriptor limit names the fix."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
        why = "name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or "not found")
        return BadInputError(f"{_brief_path(path)}: no such file or folder ({why})")
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return BadInputError(
            f"{_brief_path(path)}: cannot open (too many open files: one descriptor per shard is kept open; "
            "raise the limit, e.g. `ulimit -n 4096`)"
        )
    return BadInputError(f"{_brief_path(path)}: cannot read ({e.strerror or type(e).__name__})")


def _brief_path(path: Path, limit: int = 200) -> str:
    text = str(path)
    return text if len(text) <= limit else text[: limit - 20] + f"...({len(text)} chars)"


def pread_into(fd: int, view: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:  # the header was checked against the size at open: the file shrank since
            raise BadInputError(f"{file}: changed while being read (truncated after its header was read)")
        done += got
