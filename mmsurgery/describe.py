"""`describe`: what a checkpoint holds, as a typed result with a stable JSON form (`mmsurgery inspect`)."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mmsurgery.checkpoint.dtypes import FLOATING
from mmsurgery.checkpoint.loaded import Checkpoint
from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.errors import NoTransformerBlocksError
from mmsurgery.layout.detect import Layout, Stack, default_stack, detect
from mmsurgery.paired_format import LayerScales, paired_view

__all__ = ["SCHEMA", "Description", "describe", "describe_checkpoint"]

SCHEMA = "mmsurgery.inspect/1"


@dataclass(frozen=True)
class Description:
    path: Path
    format: str
    files: tuple[Path, ...]
    file_size: int
    num_tensors: int
    num_params: int
    dtypes: dict[str, tuple[int, int]]  # dtype -> (tensors, elements)
    layout: Layout
    default_stack: Stack | None
    unwrap_path: tuple[str, ...]
    alternatives: tuple[str, ...]
    ignored: dict[str, str]
    metadata: dict[str, str]
    scales: dict[str, LayerScales] | None = None  # λ per pathway layer of a paired checkpoint; None: a plain one

    @property
    def stacks(self) -> tuple[Stack, ...]:
        return self.layout.stacks

    def to_json(self) -> dict[str, object]:
        """The documented `mmsurgery inspect --json` schema (docs/formats.md)."""
        default = self.default_stack.prefix if self.default_stack else None
        return {
            "schema": SCHEMA,
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "file_size": self.file_size,
            "num_tensors": self.num_tensors,
            "num_params": self.num_params,
            "dtypes": {d: {"tensors": t, "elements": n} for d, (t, n) in self.dtypes.items()},
            "unwrap": {
                "path": list(self.unwrap_path),
                "alternatives": list(self.alternatives),
                "ignored": self.ignored,
            },
            "metadata_keys": sorted(self.metadata),
            "default_stack": default,
            "stacks": [{**s.to_json(), "default": s.prefix == default} for s in self.layout.stacks],
            "other": {g: {"tensors": t, "params": p} for g, (t, p) in self.layout.other.items()},
            "pathway": None
            if self.scales is None
            else {"layers": [{"layer": k, "scale": v} for k, v in self.scales.items()]},
        }


def describe_checkpoint(ck: Checkpoint) -> Description:
    dtypes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for info in ck.infos.values():
        dtypes[info.dtype][0] += 1
        dtypes[info.dtype][1] += info.numel
    layout = detect(ck.infos)
    if not layout.stacks:
        groups = ", ".join(sorted(layout.other)[:8])
        raise NoTransformerBlocksError(
            f"{ck.path}: no transformer blocks found among {len(ck)} tensors (top-level names: {groups})"
        )
    return Description(
        path=ck.path,
        format=ck.format,
        files=tuple(ck.files),
        file_size=ck.file_size,
        num_tensors=len(ck),
        num_params=sum(i.numel for i in ck.infos.values() if i.dtype in FLOATING),
        dtypes={d: (v[0], v[1]) for d, v in sorted(dtypes.items())},
        layout=layout,
        default_stack=default_stack(layout),
        unwrap_path=ck.unwrap_path,
        alternatives=ck.alternatives,
        ignored=dict(ck.ignored),
        metadata=dict(ck.metadata),
        scales=_scales(ck),
    )


def _scales(ck: Checkpoint) -> dict[str, LayerScales] | None:
    paired = paired_view(ck)
    return None if paired.is_plain else paired.scales


def describe(path: str | os.PathLike[str], key: str | None = None) -> Description:
    """Open `path` and describe it; reads only the header of a safetensors file."""
    with open_checkpoint(path, key=key) as ck:
        return describe_checkpoint(ck)
