"""verify's options, checked before anything is imported or started: batch sizes, the `--onnx` target, numbers.

Torch-free on purpose: `mmsurgery.verify.verify` checks these, starts the ONNX export process, and only then
imports torch (see `verify.api`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from mmsurgery.errors import BadInputError

__all__ = ["MAX_BATCH", "check_numbers", "onnx_target", "parse_batch_sizes"]

MAX_BATCH = 1024  # the dynamic batch dimension of exported graphs is 1..MAX_BATCH


def parse_batch_sizes(value: Sequence[int] | str) -> tuple[int, ...]:
    """`"1,4"` or `[1, 4]` → (1, 4): at least two distinct sizes in 1..1024 (dynamic batch is checked at each)."""
    if isinstance(value, str):
        try:
            sizes = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise BadInputError(f"--batch-sizes {value!r}: use comma-separated integers, e.g. 1,4") from None
    else:
        sizes = [int(v) for v in value]
    sizes = list(dict.fromkeys(sizes))
    if len(sizes) < 2 or any(not 1 <= b <= MAX_BATCH for b in sizes):
        raise BadInputError(
            f"--batch-sizes {value!r}: give at least two distinct batch sizes between 1 and {MAX_BATCH}"
        )
    return tuple(sizes)


def onnx_target(onnx: str | os.PathLike[str] | bool | None) -> Path | bool | None:
    """None (no ONNX stages), True (export to a temp dir) or a `.onnx` path: an existing file (taken as is; its
    contents are probed later) or a new one in an existing folder (exported there and kept)."""
    if onnx is None or onnx is False:
        return None
    if onnx is True:
        return True
    path = Path(onnx)
    if path.suffix != ".onnx":
        raise BadInputError(
            f"--onnx {path}: an ONNX file must end in .onnx (give --onnx alone to export to a temp dir)"
        )
    if path.exists():
        if not path.is_file():
            raise BadInputError(f"--onnx {path}: not a file")
    elif not path.parent.is_dir():
        raise BadInputError(f"--onnx {path}: folder {path.parent} does not exist")
    return path


def check_numbers(
    *,
    atol: float | None,
    rtol: float | None,
    max_latency_ratio: float | None,
    opset: int,
    weights_ulps: int,
    latency_warmup: int,
    latency_runs: int,
) -> None:
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BadInputError(f"{name} {value}: must be a finite number >= 0")
    if max_latency_ratio is not None and not (math.isfinite(max_latency_ratio) and max_latency_ratio > 0):
        raise BadInputError(f"--max-latency-ratio {max_latency_ratio}: must be a finite number > 0")
    if not 7 <= opset <= 30:
        raise BadInputError(f"--opset {opset}: choose an ONNX opset between 7 and 30 (default 20)")
    if isinstance(weights_ulps, bool) or not isinstance(weights_ulps, int) or weights_ulps < 0:
        raise BadInputError(f"--weights-ulps {weights_ulps}: must be a whole number >= 0 (0: bit-identical)")
    if latency_runs < 1 or latency_warmup < 0:
        raise BadInputError("latency_runs must be >= 1 and latency_warmup >= 0")
