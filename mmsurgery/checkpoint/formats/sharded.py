"""A sharded set, opened through its `*.index.json`: safetensors shards (read lazily, each held open like a
single file) or `pytorch_model.bin` pickle shards (loaded whole).

The index's `weight_map` is checked before any shard is opened (every shard a relative path inside the index's
folder), and every shard's tensors against it: a tensor the index does not name is an error, never dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from mmsurgery.checkpoint.formats.pickle_file import from_tensors
from mmsurgery.checkpoint.formats.safetensors_file import SafetensorsLoader
from mmsurgery.checkpoint.loaded import Checkpoint, Format, brief, naming
from mmsurgery.checkpoint.normalize import strip_prefixes, unwrap
from mmsurgery.checkpoint.pins import Pins
from mmsurgery.checkpoint.safetensors_header import MAX_TENSORS
from mmsurgery.errors import BadInputError

__all__ = ["FORMAT", "INDEX_SUFFIX", "MAX_INDEX_BYTES", "open_sharded"]

INDEX_SUFFIX = ".index.json"
MAX_INDEX_BYTES = 100_000_000  # a shard index is kilobytes; this only bounds what a damaged one can cost


def open_sharded(index: Path, key: str | None) -> Checkpoint:
    """The set `index` describes as one `Checkpoint`; `key` picks the wrapper entry of pickle shards."""
    weight_map = _read_weight_map(index)
    files = list(dict.fromkeys(index.parent / s for s in weight_map.values()))
    missing = [str(f.relative_to(index.parent)) for f in files if not os.path.exists(f)]  # else opened: checked
    if missing:
        raise BadInputError(f"{index}: shard file(s) missing: {', '.join(map(brief, missing[:4]))}")
    if index.name.startswith("pytorch_model.bin"):
        from mmsurgery.checkpoint.pickled import load_pickle  # safetensors readers (`inspect`) never pay for it

        merged: dict[str, Any] = {}
        contents: dict[Path, list[str]] = {}
        for f in files:
            tensors = naming(f, unwrap, load_pickle(f), key).tensors
            contents[f] = list(tensors)
            merged.update(tensors)
        _check_shards(index, weight_map, contents)
        return from_tensors(index, "torch-pickle-sharded", files, merged, (), (), {})
    pins = Pins()  # one descriptor per shard, held until close
    try:
        headers = {f: pins.open(f) for f in files}
        _check_shards(index, weight_map, {f: list(h.entries) for f, h in headers.items()})
        metadata: dict[str, str] = {}
        for header in headers.values():
            metadata.update(header.metadata)
        source = {raw: (f, raw) for f, header in headers.items() for raw in header.entries}  # file order
        stripped = naming(index, strip_prefixes, {n: n for n in source})
        source = {short: source[raw] for short, raw in stripped.items()}
        loader = SafetensorsLoader(source, headers, pins)
        infos = {short: loader.info(short) for short in source}
    except BaseException:
        pins.close()
        raise
    return Checkpoint(path=index, fmt="safetensors-sharded", files=files, infos=infos, metadata=metadata, loader=loader)


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's `weight_map` (tensor name -> shard file), checked: each shard a relative path that stays
    inside the index's folder, as Hugging Face writes them. Absolute paths and `..` are refused, not followed."""
    where = f"{index}: not a valid shard index"
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise BadInputError(f"{where} (larger than {MAX_INDEX_BYTES // 10**6} MB)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise BadInputError(f"{where} (JSON nested too deeply)") from None
    except _DuplicateKey as e:
        raise BadInputError(
            f"{where} (key {brief(e.key)} appears twice in one object; JSON readers disagree on which one counts)"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"{where} (not JSON: {str(e)[:200]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{where} (needs a non-empty 'weight_map' object)")
    if len(weight_map) > MAX_TENSORS:
        raise BadInputError(
            f"{where} (weight_map lists {len(weight_map):,} tensors, more than the {MAX_TENSORS:,} "
            "a checkpoint may hold)"
        )
    for name, shard in weight_map.items():
        entry = f"{index}: weight_map entry {brief(name)}"
        if not isinstance(shard, str):
            raise BadInputError(f"{entry} is {type(shard).__name__ if shard is not None else 'null'}, not a file name")
        parts = PurePosixPath(shard).parts
        if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\x00" in shard:
            raise BadInputError(f"{entry} = {brief(shard)} points outside the index's folder; shards must lie in it")
    return weight_map


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct: `json.loads` would keep the last of two and drop the first."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_shards(index: Path, weight_map: dict[str, str], contents: dict[Path, list[str]]) -> None:
    """Every tensor of every shard is listed in `weight_map` under that shard, and every listed tensor is in its
    shard: a tensor the index does not name is an error, never silently dropped."""
    for f, names in contents.items():
        for name in names:
            listed = weight_map.get(name)
            if listed is None:
                raise BadInputError(
                    f"{index}: tensor {brief(name)} is in {brief(f.name)} but not in the index's weight_map"
                )
            if index.parent / listed != f:
                raise BadInputError(
                    f"{index}: tensor {brief(name)} is in {brief(f.name)} but weight_map puts it in {brief(listed)}"
                )
    held = {name for names in contents.values() for name in names}
    lost = [n for n in weight_map if n not in held]
    if lost:
        raise BadInputError(
            f"{index}: {len(lost)} tensor(s) listed but not in their shard, e.g. {brief(lost[0])} "
            f"(weight_map says {brief(weight_map[lost[0]])})"
        )


def _claims(p: Path) -> bool:
    return p.name.endswith(INDEX_SUFFIX)


FORMAT = Format(name="sharded", claims=_claims, open=open_sharded)
