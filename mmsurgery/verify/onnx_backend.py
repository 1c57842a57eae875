"""Everything that touches onnx and onnxruntime: export, checker, ORT sessions, graph summaries.

This is the only module of mmsurgery that imports onnx or onnxruntime, and it does so inside functions, so
`import mmsurgery.verify` (and every other command) works without loading them. The onnx stage itself
(`onnx_stage.run`) and the run context use it; it imports neither.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsurgery.errors import BadInputError, one_line

__all__ = [
    "GraphSummary",
    "OrtRunner",
    "check_model",
    "export",
    "preload",
    "probe_onnx_file",
    "summarize_graph",
    "versions",
]

log = logging.getLogger(__name__)

MAX_BATCH = 1024


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def preload() -> threading.Thread:
    """Import onnx, onnxruntime and the exporter on a background thread (~3 s on 2 cores) while verify's first
    stages read files and run PyTorch, whose kernels release the GIL. Only imports, which the import lock makes
    safe; join the returned thread before exporting."""

    def run() -> None:
        for name in ("onnx", "onnxruntime", "onnxscript", "torch.onnx._internal.exporter._core"):
            try:
                importlib.import_module(name)
            except Exception:  # the stage that needs it reports the real error
                log.debug("preloading %s failed", name, exc_info=True)

    thread = threading.Thread(target=run, name="mmsurgery-preload", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter prints progress to stdout, logs torchvision notices, warns about deprecations, and on a
    failed trace logs warnings and graph dumps through torch's own handlers (which write to the stderr they were
    created with). All of that is silenced while it runs: the stage reports the failure in one line."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _dynamic_batch(model: nn.Module, count: int, batch: Any) -> Any:
    """`dynamic_shapes` making dimension 0 of each of `count` positional inputs dynamic: keyed by the forward's
    parameter names (`{"x": {0: batch}}` for the built-in ViT), one tuple for a `*inputs` forward, else positional."""
    spec = {0: batch}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (tuple(spec for _ in range(count)),)
    named = params[:count]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(named) == count and all(p.kind in positional for p in named):
        return {p.name: spec for p in named}
    return tuple(spec for _ in range(count))


def export(
    model: nn.Module,
    example: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    opset: int,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """`torch.onnx.export(dynamo=True)` with a dynamic batch dimension (1..1024) on every input, the weights in
    `<path>.data` beside the graph (external data: the exporter streams them to disk instead of building a second
    and third copy of the model in memory, and a graph over protobuf's 2 GB limit needs it anyway), the given
    opset, and the exporter's chatter silenced. `example` is one tensor or the forward's positional tensors;
    `input_names`/`output_names` name the graph's inputs/outputs."""
    args = (example,) if isinstance(example, Tensor) else tuple(example)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            model,
            args,
            os.fspath(path),
            dynamo=True,
            opset_version=opset,
            external_data=True,
            dynamic_shapes=_dynamic_batch(model, len(args), batch),
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
            verbose=False,
        )
    return Path(path)


def probe_onnx_file(path: Path) -> None:
    """Raise `BadInputError` unless `path` parses as an ONNX model (weights not needed for this)."""
    import onnx

    try:
        onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ...
        raise BadInputError(f"--onnx {path}: not an ONNX model ({type(exc).__name__}: {one_line(str(exc))})") from exc


def check_model(path: Path) -> None:
    """`onnx.checker.check_model` on the path (works past protobuf's 2 GB limit); raises on an invalid graph."""
    import onnx

    onnx.checker.check_model(os.fspath(path))


@dataclass(frozen=True)
class GraphSummary:
    """What an exported graph costs, structurally: compared field by field against the reference graph."""

    opset: dict[str, int]  # domain ("" = ai.onnx) -> version
    node_count: int  # every node, including those inside subgraphs and local functions
    op_histogram: dict[str, int]  # op type ("domain::Op" outside ai.onnx) -> count
    initializers: dict[str, int]  # "float32[384, 1152]" -> count (names ignored)
    initializer_elements: int
    gelu_approximate: dict[str, int]  # value of Gelu's `approximate` attribute -> count
    inputs: list[str]  # "x: float32[batch, 3, 224, 224]"
    outputs: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "node_count": self.node_count,
            "op_histogram": self.op_histogram,
            "initializers": self.initializers,
            "initializer_elements": self.initializer_elements,
            "gelu_approximate": self.gelu_approximate,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GraphSummary:
        """The summary `to_json` wrote (a certificate's recorded graph)."""
        return cls(
            opset={str(k): int(v) for k, v in d["opset"].items()},
            node_count=int(d["node_count"]),
            op_histogram={str(k): int(v) for k, v in d["op_histogram"].items()},
            initializers={str(k): int(v) for k, v in d["initializers"].items()},
            initializer_elements=int(d["initializer_elements"]),
            gelu_approximate={str(k): int(v) for k, v in d["gelu_approximate"].items()},
            inputs=[str(x) for x in d["inputs"]],
            outputs=[str(x) for x in d["outputs"]],
        )


def summarize_graph(path: Path) -> GraphSummary:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    ops: Counter[str] = Counter()
    inits: Counter[str] = Counter()
    gelu: Counter[str] = Counter()
    elements = 0

    def dtype_name(elem_type: int) -> str:
        name = onnx.TensorProto.DataType.Name(elem_type).lower()
        return {"float": "float32", "double": "float64"}.get(name, name)

    def visit(graph: Any) -> None:
        nonlocal elements
        for init in graph.initializer:
            inits[f"{dtype_name(init.data_type)}{list(init.dims)}"] += 1
            n = 1
            for d in init.dims:
                n *= d
            elements += n
        visit_nodes(graph.node)

    def visit_nodes(nodes: Any) -> None:
        for node in nodes:
            ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
                attr = next((a for a in node.attribute if a.name == "approximate"), None)
                gelu[attr.s.decode() if attr is not None else "none"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(model.graph)
    for function in model.functions:
        visit_nodes(function.node)

    def signature(value: Any) -> str:
        t = value.type.tensor_type
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim]
        return f"{value.name}: {dtype_name(t.elem_type)}[{', '.join(dims)}]"

    return GraphSummary(
        opset={imp.domain: int(imp.version) for imp in model.opset_import},
        node_count=sum(ops.values()),
        op_histogram=dict(sorted(ops.items())),
        initializers=dict(sorted(inits.items())),
        initializer_elements=elements,
        gelu_approximate=dict(sorted(gelu.items())),
        inputs=[signature(v) for v in model.graph.input],
        outputs=[signature(v) for v in model.graph.output],
    )


class OrtRunner:
    """An ONNX Runtime CPU session over one graph: `runner(x)` returns the outputs as float tensors."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.settings = {
            "provider": self.session.get_providers()[0],
            "graph_optimization_level": str(options.graph_optimization_level).rsplit(".", 1)[-1],
            "intra_op_num_threads": options.intra_op_num_threads,  # 0: ORT's default (one per core)
        }

    def __call__(self, x: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """Feed one tensor, or the forward's positional tensors in the graph's input order."""
        xs = (x,) if isinstance(x, Tensor) else tuple(x)
        if len(self.inputs) != len(xs):
            raise ValueError(f"the graph has {len(self.inputs)} inputs {self.inputs}; verify feeds {len(xs)}")
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.inputs, xs, strict=True)}
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]
