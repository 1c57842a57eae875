"""The pairing plan: a typed record of every pairing decision, with a JSON form that travels in the paired file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mmsurgery.paired_format import PLAN_SCHEMA, aux_weight_key, cross_modal_scale_key, module_of
from mmsurgery.pairing.transforms import Transform

__all__ = ["Pair", "Plan", "Skip", "Source"]


@dataclass(frozen=True, kw_only=True)
class Source:
    path: str
    sha256: str | None  # None in a paired file's plan: the digests are in their own keys (provenance_keys)
    format: str
    stack: str
    family: str
    depth: int
    width: int | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class Pair:
    target_key: str
    target_shape: tuple[int, ...]
    target_block: int
    role: str
    aux_keys: tuple[str, ...]
    aux_block: int | None
    transform: Transform
    aux_index: int = 0  # which auxiliary model (0: the first, whose keys are M2PT's)
    scale_shape: tuple[int, ...] = (1,)  # λ's shape (`paired_format.scale_shape`)

    @property
    def module(self) -> str:
        return module_of(self.target_key)

    @property
    def aux_weight_key(self) -> str:
        return aux_weight_key(self.module, self.aux_index)

    @property
    def cross_modal_scale_key(self) -> str:
        return cross_modal_scale_key(self.module, self.aux_index)

    def to_json(self) -> dict[str, Any]:
        return (
            {
                "target": self.target_key,
                "target_shape": list(self.target_shape),
                "target_block": self.target_block,
                "role": self.role,
                "aux": list(self.aux_keys),
                "aux_block": self.aux_block,
                "transform": self.transform.describe(),
                "transform_spec": self.transform.to_json(),
            }
            | ({"aux_index": self.aux_index} if self.aux_index else {})
            | ({"scale_shape": list(self.scale_shape)} if self.scale_shape != (1,) else {})
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Pair:
        return cls(
            target_key=d["target"],
            target_shape=tuple(d["target_shape"]),
            target_block=d["target_block"],
            role=d["role"],
            aux_keys=tuple(d["aux"]),
            aux_block=d["aux_block"],
            transform=Transform.from_json(d["transform_spec"]),
            aux_index=int(d.get("aux_index", 0)),
            scale_shape=tuple(d.get("scale_shape", (1,))),
        )


@dataclass(frozen=True, kw_only=True)
class Skip:
    target_key: str
    target_shape: tuple[int, ...]
    target_block: int
    role: str
    aux_keys: tuple[str, ...]
    aux_shape: tuple[int, ...] | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target_key,
            "target_shape": list(self.target_shape),
            "target_block": self.target_block,
            "role": self.role,
            "aux": list(self.aux_keys),
            "aux_shape": list(self.aux_shape) if self.aux_shape else None,
            "reason": self.reason,
        }


@dataclass(frozen=True, kw_only=True)
class Plan:
    target: Source
    aux: Source
    depth_policy: str
    depth_map: tuple[int | None, ...]  # target block i <- aux block depth_map[i] (None: not paired)
    roles: tuple[str, ...]
    pairs: tuple[Pair, ...]
    skips: tuple[Skip, ...]
    warnings: tuple[str, ...] = ()
    map_file: str | None = None
    aux_index: int = 0  # this plan's auxiliary, when several are paired into one file
    scale_mode: str = "per-linear"

    @property
    def summary(self) -> str:
        n = len(self.pairs) + len(self.skips)
        return (
            f"{len(self.pairs)} of {n} linears paired, {len(self.skips)} skipped; "
            f"depth {self.target.depth} <- {self.aux.depth} ({self.depth_policy})"
        )

    def to_json(self) -> dict[str, Any]:
        return (
            {
                "schema": PLAN_SCHEMA,
                "target": self.target.to_json(),
                "aux": self.aux.to_json(),
                "depth_policy": self.depth_policy,
                "depth_map": list(self.depth_map),
                "roles": list(self.roles),
                "map_file": self.map_file,
                "paired": len(self.pairs),
                "skipped": len(self.skips),
                "summary": self.summary,
                "pairs": [p.to_json() for p in self.pairs],
                "skips": [s.to_json() for s in self.skips],
                "warnings": list(self.warnings),
            }
            | ({"aux_index": self.aux_index} if self.aux_index else {})
            | ({"scale_mode": self.scale_mode} if self.scale_mode != "per-linear" else {})
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        return cls(
            target=Source(**d["target"]),
            aux=Source(**d["aux"]),
            depth_policy=d["depth_policy"],
            depth_map=tuple(d["depth_map"]),
            roles=tuple(d["roles"]),
            pairs=tuple(Pair.from_json(p) for p in d["pairs"]),
            skips=tuple(
                Skip(
                    target_key=s["target"],
                    target_shape=tuple(s["target_shape"]),
                    target_block=s["target_block"],
                    role=s["role"],
                    aux_keys=tuple(s["aux"]),
                    aux_shape=tuple(s["aux_shape"]) if s["aux_shape"] else None,
                    reason=s["reason"],
                )
                for s in d["skips"]
            ),
            warnings=tuple(d.get("warnings", ())),
            map_file=d.get("map_file"),
            aux_index=int(d.get("aux_index", 0)),
            scale_mode=d.get("scale_mode", "per-linear"),
        )
