"""One verify run's shared state: the checked options, the open checkpoints, and every model, output and graph the
stages share.

The memory rule (docs/verify.md#memory): a model is built when a stage first asks for it and released as soon as
no later stage needs it (`NEEDS`, applied by the gate after each stage); outputs are computed once and reused (the
unfolded model's outputs are the reference of both the fold and the onnx stage). Models are built without
initialising their weights and take the checkpoint's tensors as their parameters (`load_state_dict(assign=True)`),
so a model costs one copy of its weights, not two. What is alive at once is at most: the model with its pathway
(W and W_aux, during the fold stage), or PLAIN's model beside one ONNX Runtime session (or beside the exporter).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsurgery.certificate import Certificate, TensorDigest
from mmsurgery.checkpoint.dtypes import FLOATING
from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.loaded import Checkpoint, TensorInfo
from mmsurgery.hf import to_disk_names, to_model_names
from mmsurgery.paired_format import PairedCheckpoint, is_pathway_key
from mmsurgery.verify import onnx_backend
from mmsurgery.verify.arch import Arch
from mmsurgery.verify.compare import Tolerance, flatten_outputs, tolerances_for
from mmsurgery.verify.inputs import make_inputs

__all__ = [
    "NEEDS",
    "STAGES",
    "Graph",
    "Options",
    "PlainDoesNotLoad",
    "RunContext",
    "dominant_dtype",
    "forward",
    "free_memory",
]

log = logging.getLogger(__name__)

STAGES = ("weights", "keys", "fold", "onnx", "cost", "latency")

# What each stage uses from the context beyond the open checkpoints: after a stage, whatever no later stage lists
# is released. `plain`: PLAIN's PyTorch model; `session`: the ONNX Runtime session over PLAIN's graph; `skeleton`:
# the architecture without weights (shapes, configuration, example inputs).
NEEDS: dict[str, frozenset[str]] = {
    "weights": frozenset(),
    "keys": frozenset({"skeleton"}),
    "fold": frozenset({"skeleton", "plain"}),
    "onnx": frozenset({"skeleton", "plain", "session"}),
    "cost": frozenset({"skeleton", "plain"}),
    "latency": frozenset({"session"}),
}

Outputs = dict[int, list[Tensor]]  # batch size -> the model's outputs, float32


@dataclass(frozen=True, kw_only=True)
class Options:
    """A verify run's options, checked by the gate before anything expensive."""

    plain: Path
    against: Path | None
    onnx: Path | bool | None  # True: export to a temp dir; a Path: given (exists) or exported there and kept
    arch: Arch
    batch_sizes: tuple[int, ...]
    atol: float | None
    rtol: float | None
    max_latency_ratio: float | None
    heads: int | None
    opset: int
    seed: int
    latency_warmup: int
    latency_runs: int
    weights_ulps: int
    inputs_file: Path | None
    given_inputs: Mapping[str, Tensor] | None
    export_cache: Path | None
    stages: tuple[str, ...]  # the stages chosen to run, in order


@dataclass(frozen=True, kw_only=True)
class Graph:
    """PLAIN's ONNX graph as the onnx stage obtained it."""

    path: Path
    source: str  # "given", "exported", "exported (temporary)"
    exported: bool  # from PLAIN's model in this run (fresh or bound from the export cache), not a given file
    export_seconds: float | None = None
    cache: str | None = None  # what the export cache did: "hit", "stored", or why neither


class PlainDoesNotLoad(Exception):
    """PLAIN's tensors do not load strictly into the architecture: the stages that need its model are skipped."""


def dominant_dtype(ck: Checkpoint) -> str:
    """The floating dtype holding most elements (what the default tolerances depend on)."""
    totals: dict[str, int] = {}
    for info in ck.infos.values():
        if info.dtype in FLOATING:
            totals[info.dtype] = totals.get(info.dtype, 0) + info.numel
    return max(totals, key=lambda d: totals[d]) if totals else "float32"


def meta_state(infos: Mapping[str, TensorInfo]) -> dict[str, Tensor]:
    """Tensors with the checkpoint's names, shapes and dtypes and no data: enough to build and check a model."""
    return {k: torch.empty(i.shape, dtype=getattr(torch, i.dtype), device="meta") for k, i in infos.items()}


def forward(model: nn.Module, inputs: Mapping[int, tuple[Tensor, ...]]) -> Outputs:
    with torch.no_grad():
        return {b: [t.float() for t in flatten_outputs(model(*x))] for b, x in inputs.items()}


class RunContext:
    """What the stages of one run share. Stages call the methods; the gate calls `release` between stages."""

    def __init__(
        self,
        *,
        options: Options,
        plain: Checkpoint,
        paired: PairedCheckpoint | None,
        tmp: Path,
        certificate: Certificate | None = None,
        certificate_out: Path | None = None,
    ) -> None:
        self.options = options
        self.arch = options.arch
        self.plain_ck = plain
        self.paired = paired
        self.tmp = tmp
        self.dtype = dominant_dtype(plain)
        self.tol: dict[str, Tolerance] = tolerances_for(self.dtype, options.atol, options.rtol)
        plain_infos = {k: i for k, i in plain.infos.items() if not is_pathway_key(k)}
        self._plain_meta = meta_state(plain_infos)
        self._skeleton: nn.Module | None = None
        self._inputs: dict[int, tuple[Tensor, ...]] | None = None
        self._plain: nn.Module | None = None
        self._plain_call: nn.Module | None = None
        self._plain_outputs: Outputs | None = None
        self.plain_problem: str | None = None  # set by `check_plain_loads`
        self.unfolded_outputs: Outputs | None = None  # the fold stage's: the onnx stage's reference
        self.graph: Graph | None = None
        self.graph_skip = "no --onnx given"
        self.session: onnx_backend.OrtRunner | None = None
        self.reference_graph: Path | None = None
        self.built: list[str] = []  # which models were built, in order (for tests of the memory rule)
        # A fold certificate: read (`certificate`: gate with it, or cross-check it with PAIRED) or to write after
        # a passing gate (`certificate_out`). The weights stage leaves the fold's digests and dtype here.
        self.certificate = certificate
        self.certificate_out = certificate_out
        self.fold_digests: list[TensorDigest] | None = None
        self.fold_dtype = "keep"
        # PAIRED's sha256 on a second thread from the start, when a certificate names it: the weights stage uses
        # the same job for PLAIN's recorded source, so PAIRED is hashed once
        self.paired_hash = (
            HashJob(paired.ck.files, opener=paired.ck.open_pinned)
            if paired is not None and (certificate is not None or certificate_out is not None)
            else None
        )

    def paired_digest(self) -> str:
        """PAIRED's sha256 (with a certificate to write or cross-check)."""
        assert self.paired_hash is not None
        return self.paired_hash.result()

    # ---- the architecture without weights ------------------------------------------------------------------
    def skeleton(self) -> nn.Module:
        """PLAIN's architecture, built from shapes and metadata alone (on the meta device where the architecture
        allows): its keys and shapes, configuration and example inputs, never its outputs."""
        if self._skeleton is None:
            self._skeleton = self.arch.skeleton(self._plain_meta, self.plain_ck.metadata)
        return self._skeleton

    def skeleton_state(self) -> dict[str, Tensor]:
        """PLAIN's plain tensors as meta tensors: names, shapes and dtypes, no data."""
        return self._plain_meta

    def assign(self, model: nn.Module, state: Mapping[str, Tensor]) -> str | None:
        """`state`'s tensors become `model`'s (strict, no copy); the loader's first error line, else None."""
        return load_problem(self.arch, model, state, assign=True)

    def check_plain_loads(self) -> str | None:
        """Why PLAIN's tensors do not load strictly into the architecture (the error's first line), else None.
        Checked on weightless tensors: no data is read."""
        probe = self.arch.skeleton(self._plain_meta, self.plain_ck.metadata)
        self.plain_problem = load_problem(self.arch, probe, self._plain_meta)
        return self.plain_problem

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """The keys and shapes a checkpoint of the architecture holds, named as PLAIN names them: a key of PLAIN that
        maps onto a model key (`hf.to_model_names`) keeps PLAIN's name, any other gets its on-disk name."""
        model = self.skeleton()
        shapes = self.arch.state_shapes(model)
        file_keys = list(self.plain_ck.infos)
        file_name = {m: f for f, m in to_model_names(model, {k: k for k in file_keys}).items()}
        disk = to_disk_names(model, [n for n in shapes if n not in file_name])
        return {file_name.get(n) or disk[n]: s for n, s in shapes.items()}

    @property
    def inputs(self) -> dict[int, tuple[Tensor, ...]]:
        """batch size -> the forward's positional tensors (seeded, or the first rows of `--inputs`)."""
        if self._inputs is None:
            o = self.options
            self._inputs = make_inputs(self.arch, self.skeleton(), o.batch_sizes, o.seed, o.given_inputs)
        return self._inputs

    # ---- models with weights -----------------------------------------------------------------------------
    def build(self, state: Mapping[str, Tensor], metadata: Mapping[str, str], what: str) -> nn.Module:
        """The architecture of `state` holding `state`'s tensors themselves as its weights (float32, eval mode).
        Raises `PlainDoesNotLoad` with the loader's first error line when `state` does not fit."""
        model = self.arch.build(state, metadata)
        problem = load_problem(self.arch, model, state, assign=True)
        if problem:
            raise PlainDoesNotLoad(problem)
        self.built.append(what)
        return model.float().eval()

    def plain_model(self) -> nn.Module:
        """PLAIN's model, built on first use and kept until no later stage needs it."""
        if self.plain_problem:
            raise PlainDoesNotLoad(self.plain_problem)
        if self._plain is None:
            state = {k: v for k, v in self.plain_ck.items() if not is_pathway_key(k)}
            self._plain = self.build(state, self.plain_ck.metadata, "plain")
        return self._plain

    def plain_call(self) -> nn.Module:
        """What runs PLAIN: `arch.runnable(plain_model)`, one wrapper for the run (a first call settles what a
        wrapped forward returns, which names the graph's output)."""
        if self._plain_call is None:
            self._plain_call = self.arch.runnable(self.plain_model())
        return self._plain_call

    def plain_outputs(self) -> Outputs:
        """PLAIN's PyTorch outputs at every batch size, computed once."""
        if self._plain_outputs is None:
            self._plain_outputs = forward(self.plain_call(), self.inputs)
        return self._plain_outputs

    # ---- graphs ------------------------------------------------------------------------------------------
    def export(self, runnable: nn.Module, path: Path, config: Mapping[str, Any]) -> tuple[Path, str | None]:
        """Export `runnable` to `path` (external data beside it), through the export cache when one is given:
        a proven entry is bound to `runnable`'s weights instead of exporting; a fresh export is stored. Returns
        the path and what the cache did (None: no cache)."""
        inputs, outputs = self.arch.graph_names(runnable)
        example = self.inputs[max(self.options.batch_sizes)]
        opset = self.options.opset
        cache = None
        if self.options.export_cache is not None:
            from mmsurgery.verify.export_cache import ExportCache, cache_key

            cache = ExportCache(self.options.export_cache)
            key = cache_key(
                model=runnable,
                config=config,
                example=example,
                opset=opset,
                input_names=inputs,
                output_names=outputs,
                max_batch=onnx_backend.MAX_BATCH,
            )
            state = runnable.state_dict()
            found = cache.bind(key, state, path)
            if found.hit:
                return path, "hit"
            log.info("export cache: %s", found.reason)
        onnx_backend.export(runnable, example, path, opset=opset, input_names=inputs, output_names=outputs)
        if cache is None:
            return path, None
        stored = cache.store(key, path, runnable.state_dict())
        return path, "stored" if stored.stored else f"not stored: {stored.reason}"

    # ---- releasing ---------------------------------------------------------------------------------------
    def release(self, keep: frozenset[str]) -> None:
        """Drop every shared model or session not in `keep` (what the stages still to run need)."""
        dropped = False
        if "plain" not in keep and self._plain is not None:
            self._plain, self._plain_call, dropped = None, None, True
        if "session" not in keep and self.session is not None:
            self.session, dropped = None, True
        if "skeleton" not in keep and self._skeleton is not None:
            self._skeleton, dropped = None, True
        if dropped:
            free_memory()


def free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS. glibc keeps freed blocks below its (adaptive, up to
    32 MB) mmap threshold in its arenas, so a released model's tensors would stay in the process's RSS and the next
    model would come on top of them; `malloc_trim(0)` returns every whole free page (madvise). Elsewhere than glibc:
    only the collection."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


_TRIM = _malloc_trim()


def load_problem(arch: Arch, model: nn.Module, state: Mapping[str, Tensor], *, assign: bool = True) -> str | None:
    """Load `state` strictly into `model` (`Arch.load`); the error's first line when it does not fit, else None."""
    try:
        arch.load(model, state, assign=assign)
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    return None
