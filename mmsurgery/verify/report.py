"""Typed verify results: one `StageResult` per stage, gathered in a `Report` that renders to JSON and JUnit.

The rich table (`mmsurgery.render.verify_report`), the JSON report and the JUnit XML are all built from these
objects, so the three cannot disagree. Both files are written atomically (temp file in the same folder + rename).
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmsurgery.checkpoint.writer import write_text_atomic
from mmsurgery.errors import BadInputError

__all__ = [
    "SCHEMA",
    "STAGES",
    "Report",
    "StageResult",
    "Status",
    "check_output_path",
    "error_line",
    "skipped",
]

SCHEMA = "mmsurgery.verify/1"
STAGES = ("weights", "keys", "fold", "onnx", "cost", "latency")
Status = Literal["pass", "fail", "skip"]


def _jsonable(value: Any) -> Any:
    """Non-finite floats become the strings "nan"/"inf"/"-inf" (strict JSON has no literal for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """One stage: `status` is pass, fail or skip; `message` says why in one or a few lines; `numbers` holds the
    measured values (JSON-ready: numbers, strings, lists and dicts of them), written as documented in
    docs/verify.md. Each stage returns its own subclass (`WeightsResult`, `FoldResult`...), whose typed fields
    carry what a reader sees first (`headline`); a skipped or crashed stage is a bare `StageResult`."""

    name: str
    status: Status
    seconds: float = 0.0
    message: str
    numbers: Mapping[str, Any] = field(default_factory=dict)

    def headline(self) -> list[tuple[str, object]]:
        """(label, value) pairs a table shows beside the status: the stage's key numbers. None of them for a
        skip or a stage that did not get far enough to measure."""
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "message": self.message,
            "numbers": _jsonable(dict(self.numbers)),
        }


@dataclass(frozen=True, kw_only=True)
class Report:
    """Everything `verify` found. `passed` is true when no stage failed (skips are allowed)."""

    stages: tuple[StageResult, ...]
    inputs: Mapping[str, Any]
    tolerances: Mapping[str, Any]
    versions: Mapping[str, str]
    seconds: float
    config_inferred: Mapping[str, Any] = field(default_factory=dict)  # guessed config fields → value; JSON inputs

    def all_inputs(self) -> dict[str, Any]:
        """`inputs` with `config_inferred` added: what the JSON report's `inputs` and the JUnit properties hold."""
        return {**self.inputs, "config_inferred": dict(self.config_inferred)}

    @property
    def passed(self) -> bool:
        return all(s.status != "fail" for s in self.stages)

    @property
    def failed(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "fail"]

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "inputs": _jsonable(self.all_inputs()),
            "tolerances": _jsonable(dict(self.tolerances)),
            "versions": dict(self.versions),
            "stages": [s.to_json() for s in self.stages],
        }

    def to_junit(self) -> str:
        """JUnit XML: one `<testsuite name="mmsurgery.verify">` with one `<testcase>` per stage."""
        root = ET.Element("testsuites", name="mmsurgery", tests=str(len(self.stages)))
        suite = ET.SubElement(
            root,
            "testsuite",
            name="mmsurgery.verify",
            tests=str(len(self.stages)),
            failures=str(sum(s.status == "fail" for s in self.stages)),
            errors="0",
            skipped=str(sum(s.status == "skip" for s in self.stages)),
            time=f"{self.seconds:.3f}",
        )
        props = ET.SubElement(suite, "properties")
        for key, value in self.all_inputs().items():
            ET.SubElement(props, "property", name=str(key), value=json.dumps(_jsonable(value)))
        for s in self.stages:
            case = ET.SubElement(suite, "testcase", classname="mmsurgery.verify", name=s.name, time=f"{s.seconds:.3f}")
            details = json.dumps(_jsonable(dict(s.numbers)), indent=1)
            if s.status == "fail":
                ET.SubElement(case, "failure", message=s.message, type="CheckFailed").text = details
            elif s.status == "skip":
                ET.SubElement(case, "skipped", message=s.message)
            else:
                ET.SubElement(case, "system-out").text = f"{s.message}\n{details}"
        ET.indent(root)
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    def write_junit(self, path: str | os.PathLike[str]) -> Path:
        return write_text_atomic(path, self.to_junit())


def skipped(name: str, why: str) -> StageResult:
    """A stage that did not run, and why."""
    return StageResult(name=name, status="skip", message=why)


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message`: an exporter's or runtime's error, short enough for a table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_output_path(path: str | os.PathLike[str]) -> None:
    """Refuse a report path before the (long) run rather than after it: its folder must exist, be a folder and be
    writable, and the path must not itself be a folder."""
    dest = Path(path)
    folder = dest.parent
    try:
        if dest.is_dir():
            raise BadInputError(f"{dest}: is a folder; give a file name for the report")
        if folder.exists() and not folder.is_dir():
            raise BadInputError(f"{dest}: {folder} is a file, not a folder")
        if not folder.is_dir():
            raise BadInputError(f"{dest}: folder {folder} does not exist")
    except OSError as e:  # a name too long, a loop of links
        raise BadInputError(f"{dest}: not a usable report path ({e.strerror or type(e).__name__})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"{dest}: folder {folder} is not writable")
