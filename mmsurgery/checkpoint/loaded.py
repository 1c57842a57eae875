"""What every checkpoint format hands out: `TensorInfo`, the lazy `Checkpoint` view, the loader interface a
format implements (`Loader`; `PinnedLoader` for loaders whose files `Pins` holds open) and the `Format` record
each module of `checkpoint/formats/` builds, plus `naming`, which names the file in a normalisation pass's error,
and `brief`, which quotes a name from a file in one. The format modules all build on it; none imports another's
private names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mmsurgery.checkpoint.dtypes import FLOATING, ITEMSIZE
from mmsurgery.checkpoint.pins import Pins
from mmsurgery.errors import BadInputError

__all__ = ["Checkpoint", "Format", "Loader", "PinnedLoader", "TensorInfo", "brief", "naming"]

T = TypeVar("T")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Checkpoint:
    """A read-only, lazy name → tensor view of a checkpoint file or sharded set.

    Names are normalised: the wrapper was unwrapped (`unwrap_path`) and `module.` / `_orig_mod.` stripped.

    `folder` is the folder the checkpoint occupies, where no output may go (`publish.refuse_overlap`): the folder
    it was opened as, or the one holding a sharded set's or a DCP checkpoint's files; None for a file named
    directly (an output beside it is fine).
    """

    def __init__(
        self,
        *,
        path: Path,
        fmt: str,
        files: list[Path],
        infos: dict[str, TensorInfo],
        metadata: dict[str, str],
        loader: Loader,
        unwrap_path: tuple[str, ...] = (),
        alternatives: tuple[str, ...] = (),
        ignored: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.format = fmt
        self.files = files
        self.infos = infos
        self.metadata = metadata
        self.unwrap_path = unwrap_path
        self.alternatives = alternatives
        self.ignored = ignored or {}
        self._loader = loader
        self.folder: Path | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def keys(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def get(self, name: str) -> Any:
        """The tensor `name` (a torch.Tensor, possibly memory-mapped: never modify it in place)."""
        if name not in self.infos:
            raise KeyError(name)
        return self._loader.get(name)

    def read_into(self, name: str, buf: Any) -> Any:
        """The tensor `name` read into `buf` (a 1-D uint8 tensor of at least its size, owned by the caller and
        reused across calls so a streamed command touches no fresh memory per tensor): a view of `buf` with the
        tensor's dtype and shape, valid until `buf` is written again."""
        if name not in self.infos:
            raise KeyError(name)
        info = self.infos[name]
        n = info.numel * ITEMSIZE[info.dtype]
        if buf.numel() < n:
            raise ValueError(f"{name}: a {n}-byte tensor does not fit a {buf.numel()}-byte buffer")
        return self._loader.read_into(name, buf[:n])

    def read_floats(self, name: str) -> list[float]:
        """Values of a small floating-point tensor (λ), without importing torch for safetensors files."""
        if name not in self.infos:
            raise KeyError(name)
        return self._loader.read_floats(name)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Tensors one at a time, in file order, so a caller can stream a model without holding it whole."""
        for name in self.infos:
            yield name, self._loader.get(name)

    def to_state_dict(self) -> dict[str, Any]:
        return dict(self.items())

    @property
    def file_size(self) -> int:
        """Bytes of the files as they were opened (a file replaced since is not the one described)."""
        sizes = [self._loader.pinned_size(f) for f in self.files]
        return sum(f.stat().st_size if n is None else n for f, n in zip(self.files, sizes, strict=True))

    @property
    def num_params(self) -> int:
        """Elements of floating-point tensors (integer buffers such as `position_ids` are not parameters)."""
        return sum(i.numel for i in self.infos.values() if i.dtype in FLOATING)

    def open_pinned(self, file: Path) -> int | None:
        """A new descriptor (the caller closes it) on the very file this checkpoint read `file` from, so that
        hashing it for provenance reads the same bytes even if the path was replaced since; None for formats
        that were read whole at open (pickles), which the caller then opens by path."""
        return self._loader.open_pinned(file)

    def close(self) -> None:
        self._loader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Loader:
    def get(self, name: str) -> Any:
        raise NotImplementedError

    def read_into(self, name: str, buf: Any) -> Any:
        """`get(name)` copied into `buf` (exactly its size, uint8), returned as a typed view of it."""
        t = self.get(name)
        view = buf.view(t.dtype).reshape(t.shape)
        view.copy_(t)
        return view

    def read_floats(self, name: str) -> list[float]:
        return [float(v) for v in self.get(name).double().reshape(-1).tolist()]  # exact for every float dtype

    def pinned_size(self, file: Path) -> int | None:
        """The size of `file` when it was opened, where the loader holds it open; None otherwise."""
        return None

    def open_pinned(self, file: Path) -> int | None:
        """A new descriptor on the very file the loader holds open (the caller closes it); None otherwise."""
        return None

    def close(self) -> None:
        pass


class PinnedLoader(Loader):
    """A loader whose files `Pins` holds open from `open_checkpoint` to `close`."""

    _pins: Pins

    def pinned_size(self, file: Path) -> int | None:
        return self._pins.size(file)

    def open_pinned(self, file: Path) -> int | None:
        return self._pins.dup(file)

    def close(self) -> None:
        self._pins.close()


@dataclass(frozen=True, kw_only=True)
class Format:
    """One checkpoint format `open_checkpoint` reads: each module of `checkpoint/formats/` builds one, and
    `formats.FORMATS` orders them; the first whose `claims` is true opens the path.

    `claims(path)` decides cheaply, from a name, a folder's contents or a few magic bytes; `open(path, key)` returns
    the lazy `Checkpoint` (`key` picks a wrapper entry, `/` for nesting) or raises `BadInputError`. A `folder`
    format is asked about the path as given (a folder, or a file standing for its folder); any other is asked
    about a regular file: the path, or the one weights file of a folder given (`formats.folder.weights_file`).
    """

    name: str
    claims: Callable[[Path], bool]
    open: Callable[[Path, str | None], Checkpoint]
    folder: bool = False


def naming(path: Path, normalize: Callable[..., T], *args: Any) -> T:
    """Run a normalisation pass (pure, so it knows no file) and name the file in any error it raises."""
    try:
        return normalize(*args)
    except BadInputError as e:
        raise type(e)(f"{path}: {e}") from None


def brief(text: str, limit: int = 80) -> str:
    """`text` (a name read from a file, which may be long or hold anything) quoted, and cut to `limit` characters
    for an error message."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'"
