"""`mmsurgery verify`: the deployment gate for a folded checkpoint (weights · keys · fold · onnx · cost · latency).

`verify(plain, against=..., onnx=...)` returns a `Report` (rendered by the CLI as a table, written as JSON or
JUnit). onnx and onnxruntime are imported only by `verify.onnx_backend`, and only when a stage needs them.
See docs/verify.md.
"""

from mmsurgery.verify.arch import Arch, FactoryArch, VitArch
from mmsurgery.verify.archs import load_arch
from mmsurgery.verify.compare import DEFAULT_TOLERANCES, Comparison, Tolerance, tolerances_for
from mmsurgery.verify.gate import verify
from mmsurgery.verify.inputs import parse_batch_sizes
from mmsurgery.verify.report import SCHEMA, Report, StageResult

__all__ = [
    "DEFAULT_TOLERANCES",
    "SCHEMA",
    "Arch",
    "Comparison",
    "FactoryArch",
    "Report",
    "StageResult",
    "Tolerance",
    "VitArch",
    "load_arch",
    "parse_batch_sizes",
    "tolerances_for",
    "verify",
]
