"""Publishing files atomically and exclusively: the filesystem half of `writer.py`.

Temp names carry the writer's pid (`.<name>.<pid>.<rand>.mmsurgery-tmp`), so a later writer removes a dead one's
leftovers; a file or a whole new folder is published with a no-replace hard link or `renameat2(RENAME_NOREPLACE)`
(a replacing rename only under `force`); outputs may never overlap inputs; OS errors on an output become one-line
`BadInputError`s naming the path; writeback is started early so the final fsync is short. docs/formats.md,
"Atomic, exclusive outputs", states the guarantees.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmsurgery.errors import BadInputError, OutputExistsError

__all__ = ["INDEX_SUFFIX", "TEMP_SUFFIX", "check_output", "write_text_atomic"]

INDEX_SUFFIX = ".safetensors.index.json"

TEMP_SUFFIX = ".mmsurgery-tmp"


_TEMP_RE = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[A-Za-z0-9_]+)" + re.escape(TEMP_SUFFIX))


_NAME_BYTES = 200  # of the target's name kept in a temp name: pid, random part and suffix fit in 255 bytes


_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse to write over an input (always, even with `force`) or an existing file (unless `force`)."""
    refuse_overlap([Path(out)], None, inputs)
    if os.path.lexists(out) and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")


def refuse_overlap(outputs: Sequence[Path], folder: Path | None, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """An output set may never overlap an input: not one of its files, not the folder holding an input, nothing
    inside an input folder (a folder given as an input, a sharded set's: `Checkpoint.folder`), even with `force`
    (a fold into its own input folder would replace the index the rest of the set depends on, or leave a second
    model beside it), symlinks resolved."""
    for src in inputs:
        src_path = Path(src)
        src_real = Path(os.path.realpath(src_path))
        for out in outputs:
            real = Path(os.path.realpath(out))
            if src_real in real.parents:
                raise OutputExistsError(f"{out}: inside the input folder {src}; write outside it (even with --force)")
            if real == src_real or _same(src_path, out):
                raise OutputExistsError(f"{out}: the output would overwrite an input ({src}); choose another path")
        if folder is not None:
            real_folder = Path(os.path.realpath(folder))
            if real_folder == src_real or real_folder in src_real.parents:
                raise OutputExistsError(
                    f"{folder}: the output folder holds an input ({src}); choose another folder (even with --force)"
                )


def copy_new(src: Path, dst: Path) -> None:
    """Copy `src`'s bytes (through a symlink, as a Hub cache holds them) to the new file `dst`, fsynced. A source
    that cannot be read is bad input naming it, not a failed write."""
    try:
        fin = open(src, "rb")  # noqa: SIM115 - closed below; opening is where a read problem shows
    except OSError as e:
        raise BadInputError(f"{src}: cannot read ({e.strerror or type(e).__name__})") from None
    with fin, os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())
        os.fchmod(fout.fileno(), 0o666 & ~umask())


def os_error(e: OSError, path: Path) -> BadInputError:
    """One line naming the output path (not a temp name): a name too long, a read-only or unwritable folder, a
    full disk, ... are problems with the chosen output, not bugs."""
    return BadInputError(f"{path}: cannot write the output: {e.strerror or e}")


def check_name_lengths(paths: Sequence[Path]) -> None:
    """Refuse a name the filesystem cannot hold before any data is written, not at the commit."""
    for p in paths:
        probe = p.parent
        while not probe.is_dir() and probe != probe.parent:
            probe = probe.parent
        try:
            limit = os.pathconf(probe, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        n = len(os.fsencode(p.name))
        if n > limit:
            raise BadInputError(f"{p}: cannot write the output: the name is {n} bytes, this filesystem allows {limit}")


def temp_stem(name: str) -> str:
    return name.encode()[:_NAME_BYTES].decode(errors="ignore")


def temp_prefix(name: str) -> str:
    return f".{temp_stem(name)}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    """False only when no process has this pid (so its temps are provably abandoned)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, another user's; anything else: not provably dead
        return True
    return True


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def remove_stale_in(where: Path, ours: Callable[[str], bool], dest: Path) -> list[Path]:
    try:
        entries = list(os.scandir(where))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        m = _TEMP_RE.fullmatch(entry.name)
        if m is None or not ours(m["name"]) or _pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            discard_work(path, dest)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def discard_work(work: Path, dest: Path) -> None:
    """Remove a temp folder, and the files linked from it into `dest` unless its commit point (the index, or
    the one weights file) was published too: a file in `dest` that is the same inode as one in `work` is provably ours."""
    try:
        files = [p for p in work.iterdir() if p.is_file()]
    except OSError:
        files = []
    weights = [p for p in files if p.name.endswith(".safetensors")]
    marker = next((p for p in files if p.name.endswith(INDEX_SUFFIX)), weights[0] if len(weights) == 1 else None)
    if marker is None or not _same(dest / marker.name, marker):
        for p in files:
            if _same(dest / p.name, p):
                (dest / p.name).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """`renameat2(RENAME_NOREPLACE)`; False where the libc or the filesystem lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_noreplace = -100, 1
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path, *, folder: bool = False) -> None:
    """Rename, failing with FileExistsError if `dst` exists. Without renameat2 a folder falls back to rename(2),
    which refuses a non-empty folder; a file falls back to a check then a rename (racy, documented)."""
    try:
        if _renameat2_noreplace(src, dst):
            return
        if folder:
            os.rename(src, dst)
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from e
        raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def move(src: Path, dst: Path, force: bool) -> None:
    """Publish a complete temp file: replace with `force`, else a hard link that fails if `dst` appeared."""
    if force:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise OutputExistsError(f"{dst} appeared while writing; pass --force to overwrite it") from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        try:
            rename_noreplace(src, dst)
        except FileExistsError:
            raise OutputExistsError(f"{dst} appeared while writing; pass --force to overwrite it") from None
        return
    os.unlink(src)


def link(src: Path, dst: Path, force: bool) -> None:
    """Like `move`, but keeps `src`: the shared inode proves to a later writer which published files are ours."""
    if not force:
        try:
            os.link(src, dst)
            return
        except FileExistsError:
            raise OutputExistsError(f"{dst} appeared while writing; pass --force to overwrite it") from None
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
        move(src, dst, force)
        return
    tmp = dst.parent / f"{temp_prefix(dst.name)}{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        os.replace(src, dst)
        return
    os.replace(tmp, dst)


def write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str, *, force: bool = True) -> Path:
    """Write `text` to a temp file beside `path`, fsync, rename: a reader never sees a half-written file. With
    `force=False` the rename never replaces a file that appeared meanwhile (`OutputExistsError`, see `move`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~umask())
        move(Path(tmp), path, force)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


WRITEBACK_STEP = 32 << 20


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing `nbytes` at `offset` to disk now (`sync_file_range(SYNC_FILE_RANGE_WRITE)`:
    asynchronous, the page cache keeps the pages), so the final fsync waits for the last step only instead of
    the whole file; a no-op where the libc lacks it. Durability still comes from the fsync at commit."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; an error here only means no early writeback


@functools.cache
def _sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
