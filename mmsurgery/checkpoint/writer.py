"""Atomic, exclusive safetensors writing: one file or Hugging Face shards with an index, streamed tensor by tensor.

The header is computed from the tensor specs up front, so a producer (the streaming fold) hands over one
tensor at a time and nothing bigger than one tensor is held. Every file is written to a temp file (or a temp
folder) beside the target, fsynced, and published only when all of them are complete, with a no-replace link
or rename unless `force`: no half-written output, and never a silent replacement of an output that appeared
meanwhile. Temp names carry the writer's pid, so a later writer to the same output can remove the temps of a
killed one. A folder output may carry other files (a model folder's `config.json`, tokenizer files, ...), copied
into the same temp folder and published with the weights. The filesystem side (temp names, stale cleanup,
no-replace publishing, overlap checks) lives in `publish.py`. The guarantees are spelled out in docs/formats.md,
"Atomic, exclusive outputs".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint import publish
from mmsurgery.checkpoint.dtypes import ITEMSIZE, NAME_TO_CODE, torch_dtype_name
from mmsurgery.checkpoint.loaded import TensorInfo
from mmsurgery.checkpoint.publish import INDEX_SUFFIX, TEMP_SUFFIX, check_output, write_text_atomic
from mmsurgery.errors import BadInputError, OutputExistsError

__all__ = [
    "SafetensorsWriter",
    "WriteResult",
    "check_output",
    "is_folder_output",
    "parse_size",
    "write_safetensors",
    "write_text_atomic",
]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# Tensor bytes go to write() in pieces of this size. Measured on this project's VMs: one write() per multi-MB tensor
# copies into the page cache 3-5x slower (a ViT-L fold: 3.2-4.7 s against 0.85-1.8 s in pieces; docs/benchmarks.md,
# issue 13), the time all in the kernel's copy. Likely cause: a large write lets the kernel back the file with large
# folios, whose 2 MB blocks of free memory are what the VM's free page reporting handed back to the host, so each
# faults in again on first touch. `cp` writes in small pieces too; a piece costs one syscall (~5k for 1.2 GB).
WRITE_PIECE = 256 << 10


def parse_size(text: str | int) -> int:
    """`"2GB"` → 2·10⁹ bytes, `"500MiB"` → 500·2²⁰ bytes, `"1048576"` → bytes (decimal units, as HF uses)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise BadInputError(f"size {text!r}: expected bytes such as 2GB, 500MB, 1GiB or 1048576")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(frozen=True)
class WriteResult:
    files: tuple[Path, ...]
    index: Path | None
    total_size: int  # bytes of tensor data, as the index's `total_size`
    extra_files: tuple[Path, ...] = ()  # files copied into the output folder beside the weights

    @property
    def path(self) -> Path:
        """What to hand to `open_checkpoint` to read the output back."""
        return self.index or self.files[0]


def _resolve_output(path: str | os.PathLike[str]) -> tuple[Path, str, bool]:
    """(folder, stem, named as a folder). A `.safetensors` name is a file; an existing folder, a path ending in
    `/` or a name without any suffix is a folder; anything else (`out.st`) is refused rather than guessed."""
    text = os.fspath(path)
    p = Path(text)
    if p.is_dir() or text.endswith(("/", os.sep)):
        return p, "model", True
    if p.suffix == ".safetensors":
        return p.parent, p.stem, False
    if os.path.lexists(p):
        raise BadInputError(f"{p}: exists and is not a folder; name a .safetensors file, or a folder to write into")
    if p.suffix:
        raise BadInputError(
            f"{p}: an output must be a .safetensors file name or a folder; write {p.name}.safetensors for a file, "
            f"or {p.name}/ for a new folder"
        )
    return p, "model", True


def is_folder_output(path: str | os.PathLike[str]) -> bool:
    """Whether `SafetensorsWriter(path, ...)` writes into a folder (see `_resolve_output` for the rule); raises
    `BadInputError` for a path that names neither a file nor a folder."""
    return _resolve_output(path)[2]


class SafetensorsWriter:
    """Write tensors, in the order of `specs`, to `path` (`x.safetensors` or a folder), sharded if needed.

    Use as a context manager: `write()` each tensor, then `commit()`; leaving the block without `commit()`
    (an exception, Ctrl-C, SIGTERM) removes every temp file and leaves the target untouched. Inside the block
    SIGTERM (when nobody else handles it) cleans up like Ctrl-C, then ends the process by SIGTERM as before.
    Filesystem errors on the output (a name too long, a read-only or unwritable folder, a full disk) raise
    `BadInputError` naming the path; an output that exists, or appears before the commit, raises
    `OutputExistsError` unless `force`; an output that overlaps an input raises it even with `force`.

    `on_progress(bytes_written, bytes_total)` is called after each tensor (the CLI draws its progress bar with it).

    `extra_files` (output name -> source file, for a folder output only) are copied into the output folder and
    published with the weights, as part of the same set: a model folder's `config.json` and tokenizer files.
    In an existing folder, a set of the other layout under the same stem (`model.safetensors` when writing
    shards, `model.safetensors.index.json` when writing one file) is part of the output too: refused without
    `force`, removed with it before anything is published, so the folder never holds two models.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorInfo],
        *,
        metadata: Mapping[str, str] | None = None,
        shard_size: int | str | None = None,
        force: bool = False,
        inputs: Sequence[str | os.PathLike[str]] = (),
        extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        try:
            folder, stem, named_folder = _resolve_output(path)
        except OSError as e:
            raise publish.os_error(e, Path(path)) from e
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._original_metadata = dict(self.metadata)
        limit = parse_size(shard_size) if shard_size is not None else None
        groups = _plan_shards(specs, limit)
        n = len(groups)
        if n == 1:
            names, self.index = [f"{stem}.safetensors"], None
        else:
            names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            self.index = folder / f"{stem}{INDEX_SUFFIX}"
        self.targets = [folder / name for name in names]
        self.force = force
        self._folder = folder
        self._stem = stem
        outputs = [*self.targets, *([self.index] if self.index else [])]
        _check_extras(list(extra_files or {}), outputs, named_folder)
        self._extras = {folder / name: Path(src) for name, src in (extra_files or {}).items()}
        other = folder / (f"{stem}.safetensors" if self.index else f"{stem}{INDEX_SUFFIX}")
        self._retire = other if named_folder and os.path.lexists(other) else None
        try:
            publish.refuse_overlap(
                [*outputs, *self._extras, *([self._retire] if self._retire else [])],
                folder if named_folder else None,
                [*inputs, *self._extras.values()],
            )
            self.removed_stale = self._remove_stale()  # first: a dead writer's linked files are not outputs
            if not force:
                for t in [*outputs, *self._extras]:
                    if os.path.lexists(t):
                        raise OutputExistsError(f"{t} exists; pass --force to overwrite it")
                if self._retire is not None:
                    raise OutputExistsError(
                        f"{self._retire} exists (a model in the other layout, which would be left beside this one); "
                        "pass --force to replace it"
                    )
            for src in self._extras.values():
                if not src.is_file():
                    raise BadInputError(f"{src}: no such file to copy into the output")
            self._new_folder = not folder.is_dir()
            if self._new_folder and os.path.lexists(folder):
                raise BadInputError(f"{folder}: exists and is not a folder; choose another output path")
            publish.check_name_lengths([*outputs, *self._extras, *([folder] if self._new_folder else [])])
            if self._new_folder:
                folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise publish.os_error(e, folder) from e
        self._groups = groups
        self._order = [s.name for g in groups for s in g]
        self._specs = {s.name: s for s in specs}
        self._total = sum(_nbytes(s) for s in specs)
        self._pos = 0
        self._done = 0
        self._on_progress = on_progress
        self._shard = -1
        self._file: Any = None
        self._written = 0  # bytes handed to the current shard's file
        self._flushed = 0  # of which writeback was started
        self._temps: list[Path] = []
        self._work: Path | None = None
        self._committed = False
        self._old_term: Any = None
        self._terminated = False

    def __enter__(self) -> SafetensorsWriter:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_term = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if not self._committed:
                self.abort()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
                self._old_term = None
            if self._terminated:  # cleaned up: now die of SIGTERM, as the default action would have
                os.kill(os.getpid(), signal.SIGTERM)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._terminated = True
        raise KeyboardInterrupt

    def write(self, name: str, tensor: Any) -> None:
        if self._pos >= len(self._order) or self._order[self._pos] != name:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing more"
            raise ValueError(f"tensors must come in spec order: got {name!r}, expected {expected!r}")
        spec = self._specs[name]
        if torch_dtype_name(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, header says {spec.dtype} {spec.shape}")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(_uint8()).numpy())
        shard = self._shard_of(self._pos)
        try:
            if shard != self._shard:
                self._open_shard(shard)
            for start in range(0, data.nbytes, WRITE_PIECE):
                self._file.write(data[start : start + WRITE_PIECE])
            self._written += data.nbytes
            if self._written - self._flushed >= publish.WRITEBACK_STEP:
                publish.start_writeback(self._file.fileno(), self._flushed, self._written - self._flushed)
                self._flushed = self._written
        except OSError as e:
            raise publish.os_error(e, self.targets[shard]) from e
        self._pos += 1
        self._done += data.nbytes
        if self._on_progress is not None:
            self._on_progress(self._done, self._total)

    def commit(self, patch: Mapping[str, str] | None = None) -> WriteResult:
        """Publish the output. `patch` sets metadata keys written with a fixed-width stand-in to their values
        (each the same length as what it replaces: a digest computed while the tensors streamed) before anything
        is published; the header keeps its length, so no tensor moves."""
        if self._pos != len(self._order):
            raise ValueError(f"{len(self._order) - self._pos} tensor(s) were never written")
        try:
            self._close_file()
            if patch:
                self._patch_headers(patch)
            if self._work is None:
                publish.move(self._temps[0], self.targets[0], self.force)
                publish.fsync_dir(self._folder)
            else:
                self._publish_work()
        except OSError as e:
            raise publish.os_error(e, self.index or self.targets[0]) from e
        self._committed = True
        self._temps = []
        return WriteResult(tuple(self.targets), self.index, self.total_size, tuple(self._extras))

    def _publish_work(self) -> None:
        work = self._work
        assert work is not None
        for dst, src in self._extras.items():
            publish.copy_new(src, work / dst.name)
        if self.index is not None:
            weight_map = {s.name: self.targets[i].name for i, g in enumerate(self._groups) for s in g}
            body = {"metadata": {"total_size": self.total_size, **self.metadata}, "weight_map": weight_map}
            publish.write_new(work / self.index.name, json.dumps(body, indent=2) + "\n")
        publish.fsync_dir(work)
        if self._new_folder:
            os.chmod(work, 0o777 & ~publish.umask())
            try:
                publish.rename_noreplace(work, self._folder, folder=True)
            except FileExistsError as e:
                if not self.force:
                    msg = f"{self._folder} appeared while writing; pass --force to write into it"
                    raise OutputExistsError(msg) from e
            else:
                self._work = None
                publish.fsync_dir(self._folder.parent)
                return
        last = self.index or self.targets[0]  # the commit point: a reader opens the set through it
        if self.force:  # retire the old set (and one of the other layout) before any of its files changes
            for old in (self.index, self._retire):
                if old is not None and os.path.lexists(old):
                    os.unlink(old)
        for t in [*self.targets, *([self.index] if self.index else []), *self._extras]:
            if t != last:
                publish.link(work / t.name, t, self.force)
        publish.link(work / last.name, last, self.force)
        publish.fsync_dir(self._folder)
        self._committed = True
        shutil.rmtree(work, ignore_errors=True)
        self._work = None

    def _patch_headers(self, patch: Mapping[str, str]) -> None:
        for key, new in patch.items():
            old = self.metadata.get(key)
            if old is None or len(old) != len(new):
                raise ValueError(f"a metadata patch must set a written key to a value of its length: {key!r}")
            self.metadata[key] = new
        for shard, temp in enumerate(self._temps):
            header = _header(self._groups[shard], self.metadata)
            with open(temp, "r+b") as f:
                if len(header) != len(_header(self._groups[shard], self._original_metadata)):
                    raise ValueError("the patched header changed length")
                f.write(header)
                f.flush()
                os.fsync(f.fileno())

    def abort(self) -> None:
        """Remove every temp file, and any file this writer linked into place before its commit point."""
        with contextlib.suppress(OSError):
            self._close_file()
        if self._work is not None:
            publish.discard_work(self._work, self._folder)
            self._work = None
        for temp in self._temps:
            temp.unlink(missing_ok=True)
        self._temps = []

    @property
    def total_size(self) -> int:
        return self._total

    def _remove_stale(self) -> list[Path]:
        """Temps of this output left by writers that are dead (killed): only names of our pattern whose pid
        is not a live process, never one of a live writer."""
        removed = publish.remove_stale_in(
            self._folder.parent, {publish.temp_stem(self._folder.name)}.__contains__, self._folder
        )
        shard_re = re.compile(re.escape(self._stem) + r"-\d{5}-of-\d{5}\.safetensors")
        own = {publish.temp_stem(n) for n in (f"{self._stem}.safetensors", f"{self._stem}{INDEX_SUFFIX}")}
        own |= {publish.temp_stem(t.name) for t in self.targets}

        def ours(name: str) -> bool:
            return name in own or shard_re.fullmatch(name) is not None

        return removed + publish.remove_stale_in(self._folder, ours, self._folder)

    def _shard_of(self, pos: int) -> int:
        for i, g in enumerate(self._groups):
            if pos < len(g):
                return i
            pos -= len(g)
        raise IndexError(pos)

    def _open_shard(self, shard: int) -> None:
        self._close_file()
        target = self.targets[shard]
        if self._new_folder or self.index is not None or self._extras:
            if self._work is None:
                index_name = f"{self._stem}{INDEX_SUFFIX}"
                parent, name = (
                    (self._folder.parent, self._folder.name) if self._new_folder else (self._folder, index_name)
                )
                self._work = Path(tempfile.mkdtemp(dir=parent, prefix=publish.temp_prefix(name), suffix=TEMP_SUFFIX))
            tmp = self._work / target.name
            self._temps.append(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=publish.temp_prefix(target.name), suffix=TEMP_SUFFIX)
            self._temps.append(Path(name))
        header = _header(self._groups[shard], self.metadata)
        try:  # reserve the extents up front: fewer block allocations while streaming, and ENOSPC before any data
            os.posix_fallocate(fd, 0, len(header) + sum(_nbytes(s) for s in self._groups[shard]))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: write as usual
                os.close(fd)
                raise
        self._file = os.fdopen(fd, "wb")
        self._file.write(header)
        self._written = len(header)
        self._flushed = 0
        self._shard = shard

    def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), 0o666 & ~publish.umask())
            finally:
                f.close()


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    metadata: Mapping[str, str] | None = None,
    shard_size: int | str | None = None,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
) -> WriteResult:
    """Write a whole in-memory state dict atomically (see `SafetensorsWriter` for streaming)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    specs = [TensorInfo(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in items]
    options: dict[str, Any] = dict(metadata=metadata, shard_size=shard_size, force=force, inputs=inputs)
    with SafetensorsWriter(path, specs, extra_files=extra_files, **options) as w:
        for name, t in items:
            w.write(name, t)
        return w.commit()


def _check_extras(names: Sequence[str], outputs: Sequence[Path], named_folder: bool) -> None:
    """Extra files are plain names inside a folder output that no weight file of the set uses (caller errors)."""
    if names and not named_folder:
        raise ValueError("extra_files need a folder output, not a single .safetensors file")
    taken = {t.name for t in outputs}
    for name in names:
        if name in taken or name in ("", ".", "..") or "/" in name or os.sep in name or name.endswith(TEMP_SUFFIX):
            raise ValueError(f"extra file name {name!r}: must be a plain file name that no weight file uses")


def _nbytes(spec: TensorInfo) -> int:
    return spec.numel * ITEMSIZE[spec.dtype]


def _plan_shards(specs: Sequence[TensorInfo], limit: int | None) -> list[list[TensorInfo]]:
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for s in specs:
        n = _nbytes(s)
        if limit is not None and groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += n
    return groups


def _header(specs: Sequence[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for s in specs:
        n = _nbytes(s)
        header[s.name] = {
            "dtype": NAME_TO_CODE[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _uint8() -> Any:
    import torch

    return torch.uint8
