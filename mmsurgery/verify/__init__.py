"""`mmsurgery verify`: the deployment gate for a folded checkpoint (weights · keys · fold · onnx · cost · latency).

`verify(plain, against=..., onnx=...)` returns a `Report` (rendered by the CLI as a table, written as JSON or
JUnit). Importing this package loads neither torch nor onnx: `verify` starts the ONNX export process first
(`verify.api`); onnx and onnxruntime are imported only by `verify.onnx_stage`, when a stage needs them.
See docs/verify.md.
"""

from typing import Any

from mmsurgery.verify.api import verify
from mmsurgery.verify.options import parse_batch_sizes

# Importing these loads torch; `verify` itself starts the ONNX export process before it does (verify.api).
_LAZY = {
    "Arch": "mmsurgery.verify.arch",
    "FactoryArch": "mmsurgery.verify.arch",
    "VitArch": "mmsurgery.verify.arch",
    "load_arch": "mmsurgery.verify.arch",
    "DEFAULT_TOLERANCES": "mmsurgery.verify.compare",
    "Comparison": "mmsurgery.verify.compare",
    "Tolerance": "mmsurgery.verify.compare",
    "tolerances_for": "mmsurgery.verify.compare",
    "SCHEMA": "mmsurgery.verify.report",
    "Report": "mmsurgery.verify.report",
    "StageResult": "mmsurgery.verify.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmsurgery.verify' has no attribute {name!r}")


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
