"""The keys stage: PLAIN holds exactly the plain model's keys and shapes, and no leftover pathway tensor.

Pure functions over name → shape mappings, so the stage reads headers only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmsurgery.paired_format import is_pathway_key
from mmsurgery.verify.report import StageResult

if TYPE_CHECKING:
    from mmsurgery.verify.context import RunContext

__all__ = ["KeysResult", "check_keys", "is_pathway_key", "run"]

Shapes = Mapping[str, Sequence[int]]
_LISTED = 20


def _diff(have: Shapes, want: Shapes) -> dict[str, Any]:
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [
        {"key": k, "shape": list(have[k]), "expected": list(want[k])}
        for k in want
        if k in have and tuple(have[k]) != tuple(want[k])
    ]
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": shapes}


def _clip(items: list[Any]) -> list[Any]:
    return items[:_LISTED]


def _names(items: Sequence[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
    return ", ".join(items[:3]) + more


@dataclass(frozen=True, kw_only=True)
class KeysResult(StageResult):
    name: str = "keys"
    plain_keys: int
    leftover_pathway: int

    def headline(self) -> list[tuple[str, object]]:
        return [("keys", self.plain_keys), ("leftover pathway", self.leftover_pathway)]


def run(ctx: RunContext) -> KeysResult:
    """The stage as the gate runs it: PLAIN's headers against the architecture's skeleton and PAIRED's headers."""
    plain = {k: i.shape for k, i in ctx.plain_ck.infos.items()}
    paired = {k: i.shape for k, i in ctx.paired.ck.infos.items()} if ctx.paired is not None else None
    return check_keys(plain, ctx.model_shapes(), paired)


def check_keys(plain: Shapes, model: Shapes, paired: Shapes | None = None) -> KeysResult:
    """Compare PLAIN's key → shape map with the model's (what `--arch` builds) and, when given, with the paired
    checkpoint's minus its pathway keys. Lists are clipped to 20 entries; counts are exact."""
    leftover = [k for k in plain if is_pathway_key(k)]
    vs_model = _diff(plain, model)
    problems: list[str] = []
    if leftover:
        problems.append(f"{len(leftover)} leftover pathway tensor(s): {_names(leftover)} (fold the checkpoint)")
    unexpected = [k for k in vs_model["unexpected"] if not is_pathway_key(k)]
    if vs_model["missing"]:
        problems.append(f"{len(vs_model['missing'])} key(s) of the model missing: {_names(vs_model['missing'])}")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) the model does not have: {_names(unexpected)}")
    if vs_model["shape_mismatch"]:
        first = vs_model["shape_mismatch"][0]
        problems.append(
            f"{len(vs_model['shape_mismatch'])} shape mismatch(es), e.g. {first['key']} {first['shape']} vs "
            f"{first['expected']}"
        )
    numbers: dict[str, Any] = {
        "plain_keys": len(plain),
        "model_keys": len(model),
        "leftover_pathway": _clip(leftover),
        "leftover_pathway_count": len(leftover),
        "vs_model": {k: _clip(v) for k, v in vs_model.items()},
    }
    if paired is not None:
        plain_part = {k: v for k, v in paired.items() if not is_pathway_key(k)}
        vs_paired = _diff({k: v for k, v in plain.items() if not is_pathway_key(k)}, plain_part)
        numbers["paired_plain_keys"] = len(plain_part)
        numbers["vs_paired"] = {k: _clip(v) for k, v in vs_paired.items()}
        n_paired = sum(len(v) for v in vs_paired.values())
        if n_paired:
            what = [f"{len(v)} {k.replace('_', ' ')}" for k, v in vs_paired.items() if v]
            first = (vs_paired["missing"] or vs_paired["unexpected"] or [vs_paired["shape_mismatch"][0]["key"]])[0]
            problems.append(f"differs from PAIRED without its pathway keys: {', '.join(what)} (e.g. {first})")
    counts = {"plain_keys": len(plain), "leftover_pathway": len(leftover), "numbers": numbers}
    if problems:
        return KeysResult(status="fail", message="; ".join(problems), **counts)
    against = f" and PAIRED's {numbers['paired_plain_keys']} plain keys" if paired is not None else ""
    message = f"{len(plain)} keys and shapes match the model{against}; no pathway tensors"
    return KeysResult(status="pass", message=message, **counts)
