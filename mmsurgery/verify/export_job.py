"""The gate's ONNX exports, run in a child process while the other stages run in this one.

A dynamo export of a ViT-S takes ~10 s of single-threaded tracing, about half a gate's wall time. It needs only
PLAIN's file and the architecture, so verify starts it first (`start`) and collects it when the onnx stage needs
the graph (`ExportJob.result`). The child builds PLAIN's model and the cost reference exactly as the gate does
(`arch.load_model`), exports PLAIN's graph (unless one was given) and the reference's (unless the architecture
proves it is PLAIN's own graph, `Arch.same_graph`), and writes a small JSON result. A thread would not do: the
tracer patches `torch.nn.Module` globally while it runs. `mmsurgery.verify.verify` starts the child before it
imports torch itself, so the two processes' start-ups overlap too.

An `Arch` object that cannot be named by a spec string (a custom subclass given to the Python API) is exported
in this process instead, by the same function.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ExportJob", "ExportResult", "export_graphs", "export_spec", "start"]


@dataclass(frozen=True)
class ExportResult:
    plain: Path | None  # PLAIN's exported graph; None when a graph was given
    reference: Path | None  # the reference graph: a fresh export, or `plain` itself when `same_graph`
    same_graph: bool
    plain_seconds: float
    reference_seconds: float
    error: str | None = None  # "Type: first line" of an export failure
    failed: str | None = None  # "plain" or "reference": which export failed

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportResult:
        return cls(
            plain=Path(data["plain"]) if data.get("plain") else None,
            reference=Path(data["reference"]) if data.get("reference") else None,
            same_graph=bool(data.get("same_graph")),
            plain_seconds=float(data.get("plain_seconds", 0.0)),
            reference_seconds=float(data.get("reference_seconds", 0.0)),
            error=data.get("error"),
            failed=data.get("failed"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "plain": str(self.plain) if self.plain else None,
            "reference": str(self.reference) if self.reference else None,
            "same_graph": self.same_graph,
            "plain_seconds": self.plain_seconds,
            "reference_seconds": self.reference_seconds,
            "error": self.error,
            "failed": self.failed,
        }


def _atomic_export(model: Any, example: Any, dest: Path, opset: int) -> float:
    """Export to a temp file beside `dest`, then rename: a kept graph is never half-written."""
    from mmsurgery.verify import onnx_stage

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    start = time.perf_counter()
    try:
        onnx_stage.export(model, example, tmp, opset=opset)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - start


def export_graphs(spec: dict[str, Any], arch: Any = None) -> ExportResult:
    """Build PLAIN's model and the reference from `spec["plain"]` as the gate does, make the example batch as the
    gate does (`inputs.make_inputs`: the largest batch size), and export what `spec` asks: `plain_out` (None: a
    graph was given, export only the reference) and `reference_out`."""
    from mmsurgery.checkpoint.reader import open_checkpoint
    from mmsurgery.pathway import split_paired
    from mmsurgery.verify.arch import load_arch, load_model
    from mmsurgery.verify.inputs import make_inputs, read_inputs

    if arch is None:
        arch = load_arch(spec["arch"], spec.get("heads"))
    with open_checkpoint(spec["plain"]) as ck:
        state, metadata = ck.to_state_dict(), dict(ck.metadata)
    plain_part, _ = split_paired(state)
    opset = int(spec["opset"])
    plain_out = Path(spec["plain_out"]) if spec.get("plain_out") else None
    model = load_model(arch, plain_part, metadata)
    if isinstance(model, str):
        return ExportResult(None, None, False, 0.0, 0.0, error=model, failed="plain")
    sizes = tuple(spec["batch_sizes"])
    given = read_inputs(spec["inputs"], sizes) if spec.get("inputs") else None
    example = make_inputs(arch, model, (max(sizes),), int(spec["seed"]), given)[max(sizes)]
    plain_seconds = 0.0
    if plain_out is not None:
        try:
            plain_seconds = _atomic_export(model, example, plain_out, opset)
        except Exception as exc:
            return ExportResult(None, None, False, 0.0, 0.0, error=_line(exc), failed="plain")
    reference = load_model(arch, plain_part, metadata, reference=True)
    if isinstance(reference, str):
        return ExportResult(plain_out, None, False, plain_seconds, 0.0, error=reference, failed="reference")
    if plain_out is not None and arch.same_graph(model, reference):
        return ExportResult(plain_out, plain_out, True, plain_seconds, 0.0)
    try:
        reference_seconds = _atomic_export(reference, example, Path(spec["reference_out"]), opset)
    except Exception as exc:
        return ExportResult(plain_out, None, False, plain_seconds, 0.0, error=_line(exc), failed="reference")
    return ExportResult(plain_out, Path(spec["reference_out"]), False, plain_seconds, reference_seconds)


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class ExportJob:
    """`export_graphs` running in a child process (or already done, for an in-process export), with the temp
    folder that holds its spec, log, result and temporary graphs. `close()` stops it and removes the folder."""

    def __init__(self, folder: Path, given: bool) -> None:
        self.folder = folder
        self.given = given  # PLAIN's graph was given (--onnx FILE exists): only the reference is exported
        self._process: subprocess.Popen[bytes] | None = None
        self._done: ExportResult | None = None

    @property
    def _result_path(self) -> Path:
        return self.folder / "export-result.json"

    def result(self) -> ExportResult:
        """Wait for the child and return what it exported (or the error it hit)."""
        if self._done is not None:
            return self._done
        assert self._process is not None
        code = self._process.wait()
        if self._result_path.is_file():
            self._done = ExportResult.from_json(json.loads(self._result_path.read_text()))
        else:
            log = (self.folder / "export.log").read_text(errors="replace")
            tail = [ln for ln in log.splitlines() if ln.strip()][-1:]
            why = tail[0] if tail else f"exit code {code}"
            self._done = ExportResult(None, None, False, 0.0, 0.0, error=f"export process failed: {why}")
        return self._done

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def export_spec(
    *,
    plain: str | os.PathLike[str],
    arch: str | None,
    heads: int | None,
    onnx: Path | bool,
    inputs: str | os.PathLike[str] | None,
    batch_sizes: tuple[int, ...],
    seed: int,
    opset: int,
    folder: Path,
) -> dict[str, Any]:
    """What `export_graphs` needs, as JSON: PLAIN's graph goes to `onnx` (a new path, kept) or into `folder`
    (`onnx` True); an existing `onnx` file is given, so only the reference is exported."""
    given = isinstance(onnx, Path) and onnx.exists()
    return {
        "plain": str(Path(plain).resolve()),
        "arch": arch,
        "heads": heads,
        "inputs": str(Path(inputs).resolve()) if inputs is not None else None,
        "batch_sizes": list(batch_sizes),
        "seed": seed,
        "opset": opset,
        "plain_out": None if given else str(Path(onnx).resolve() if isinstance(onnx, Path) else folder / "plain.onnx"),
        "reference_out": str(folder / "reference.onnx"),
    }


# `-c`, not `-m mmsurgery.verify.export_job`: the package imports this module, and runpy warns when it runs a
# module that is already imported.
_CHILD = "import sys; from mmsurgery.verify.export_job import _main; sys.exit(_main(sys.argv[1:]))"


def start(spec_of: Any, arch: Any = None) -> ExportJob:
    """Start `export_graphs` in a child process; `spec_of(folder)` makes the spec for the job's temp folder.
    With `arch` (an Arch object that has no `--arch` string) the export runs here, synchronously."""
    folder = Path(tempfile.mkdtemp(prefix="mmsurgery-export-"))
    spec = spec_of(folder)
    job = ExportJob(folder, given=spec.get("plain_out") is None)
    if arch is not None:
        job._done = export_graphs(spec, arch)
        return job
    spec_path = folder / "export-spec.json"
    spec_path.write_text(json.dumps({**spec, "result": str(job._result_path)}))
    # The child sees this process's sys.path (as multiprocessing's spawn arranges), so an `--arch` module found
    # here (on PYTHONPATH, beside a script, added by a test runner) is found there too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
    with (folder / "export.log").open("wb") as out:
        job._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return job


def _main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = export_graphs(spec)
    Path(spec["result"]).write_text(json.dumps(result.to_json()))
    return 0
