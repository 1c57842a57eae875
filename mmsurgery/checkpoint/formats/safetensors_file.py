"""A single `.safetensors` file: the header only at open, each tensor read when asked.

torch is imported on the first `get`. The file is held open from `open_checkpoint` to `close`, so the Checkpoint
reads the file it described even if the path is replaced meanwhile (see `pins.Pins`). `SafetensorsLoader` also
reads the shards of a sharded set (`formats.sharded`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.loaded import Checkpoint, Format, PinnedLoader, TensorInfo, naming
from mmsurgery.checkpoint.normalize import strip_prefixes
from mmsurgery.checkpoint.pins import Pins, pread_into
from mmsurgery.checkpoint.safetensors_header import decode_floats
from mmsurgery.errors import BadInputError

__all__ = ["FORMAT", "SUFFIX", "SafetensorsLoader", "open_safetensors"]

SUFFIX = ".safetensors"


class SafetensorsLoader(PinnedLoader):
    """Reads each tensor with `pread` into a fresh, owned buffer, at the offsets the validated header gives.

    Not memory-mapped on purpose: a streamed command's resident memory stays near the tensors it holds (mapped
    pages would count in RSS), and returned tensors are ordinary writable tensors (no copy-on-write traps).
    `source` maps a normalised name to (file, raw name); `pins` holds the descriptor each header was read through.
    """

    def __init__(self, source: dict[str, tuple[Path, str]], headers: dict[Path, Any], pins: Pins) -> None:
        self._source = source
        self._headers = headers
        self._pins = pins

    def _read(self, name: str) -> tuple[Any, Any, Path]:
        """(the file's header, the tensor's header entry, the file)."""
        file, raw = self._source[name]
        header = self._headers[file]
        return header, header.entries[raw], file

    def info(self, name: str) -> TensorInfo:
        """Name, dtype and shape of `name`, from its header entry."""
        _header, entry, _file = self._read(name)
        return TensorInfo(name, entry.dtype, entry.shape)

    def get(self, name: str) -> Any:
        import torch

        _header, entry, _file = self._read(name)
        return self.read_into(name, torch.empty(entry.end - entry.begin, dtype=torch.uint8))

    def read_into(self, name: str, buf: Any) -> Any:
        import torch

        header, entry, file = self._read(name)
        n = entry.end - entry.begin
        if n:
            pin = self._pins.check(file)
            pread_into(pin.fd, memoryview(buf.numpy()), header.data_start + entry.begin, file)
            self._pins.check(file)  # a write during the read changed the mtime: these bytes may be torn
        return buf.view(getattr(torch, entry.dtype)).reshape(entry.shape)

    def read_floats(self, name: str) -> list[float]:
        header, entry, file = self._read(name)
        pin = self._pins.check(file)
        raw = os.pread(pin.fd, entry.end - entry.begin, header.data_start + entry.begin)
        self._pins.check(file)
        if len(raw) != entry.end - entry.begin:
            raise BadInputError(f"{file}: changed while being read (truncated after its header was read)")
        try:
            return decode_floats(raw, entry.dtype)
        except BadInputError as e:
            raise BadInputError(f"{file}: tensor {name!r}: {e}") from None


def open_safetensors(p: Path) -> Checkpoint:
    """The safetensors file `p` as a lazy `Checkpoint`, names stripped of `module.` / `_orig_mod.`."""
    pins = Pins()
    try:
        header = pins.open(p)
        names = list(header.entries)
        stripped = naming(p, strip_prefixes, {n: n for n in names})
        source = {short: (p, raw) for short, raw in stripped.items()}
        loader = SafetensorsLoader(source, {p: header}, pins)
        infos = {short: loader.info(short) for short in source}
    except BaseException:
        pins.close()
        raise
    return Checkpoint(path=p, fmt="safetensors", files=[p], infos=infos, metadata=header.metadata, loader=loader)


def _claims(p: Path) -> bool:
    return p.suffix == SUFFIX


def _open(p: Path, key: str | None) -> Checkpoint:
    if key is not None:
        raise BadInputError("--key applies to pickled checkpoints; a safetensors file has no wrapper")
    return open_safetensors(p)


FORMAT = Format(name="safetensors", claims=_claims, open=_open)
