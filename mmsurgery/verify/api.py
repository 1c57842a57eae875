"""`verify`: the deployment gate's entry point, torch-free until the ONNX export process has been started.

A dynamo export is the slowest part of a gate (~10 s for a ViT-S) and needs only PLAIN's file and the options,
so `verify` checks the options, starts the export in a child process (`verify.export_job`) and only then imports
torch and the stages (`verify.gate`): the two processes' start-ups and the first stages overlap the export.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mmsurgery.verify import export_job
from mmsurgery.verify.options import check_numbers, onnx_target, parse_batch_sizes

if TYPE_CHECKING:
    from mmsurgery.verify.arch import Arch
    from mmsurgery.verify.report import Report

__all__ = ["DEFAULT_BATCH_SIZES", "DEFAULT_OPSET", "verify"]

DEFAULT_BATCH_SIZES = (1, 4)
DEFAULT_OPSET = 20


def verify(
    plain: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    onnx: str | os.PathLike[str] | bool | None = None,
    arch: str | Arch = "vit",
    inputs: str | os.PathLike[str] | None = None,
    batch_sizes: Sequence[int] | str = DEFAULT_BATCH_SIZES,
    atol: float | None = None,
    rtol: float | None = None,
    max_latency_ratio: float | None = None,
    heads: int | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    latency_warmup: int = 3,
    latency_runs: int = 15,
    weights_ulps: int = 0,
) -> Report:
    """Verify the plain checkpoint `plain` (see docs/verify.md) and return the `Report`; never prints.

    `against`: the trained paired checkpoint it was folded from (enables the weights stage, which proves PLAIN
    bit-identical to its fold, or within `weights_ulps` units in the last place, and the fold stage; the onnx
    stage then compares ONNX Runtime with this unfolded model, the source of truth). `onnx`: True exports PLAIN to
    a temp dir; a path to an existing `.onnx` is taken as is, a new path is exported there and kept. `arch`:
    "vit", "package.module:factory", or an `Arch` object. Raises `BadInputError` on bad input or options, before
    any expensive work.
    """
    started = time.perf_counter()
    sizes = parse_batch_sizes(batch_sizes)
    check_numbers(
        atol=atol,
        rtol=rtol,
        max_latency_ratio=max_latency_ratio,
        opset=opset,
        weights_ulps=weights_ulps,
        latency_warmup=latency_warmup,
        latency_runs=latency_runs,
    )
    target = onnx_target(onnx)
    job = None
    if target is not None and isinstance(arch, str) and os.path.exists(plain):
        spec = {"plain": plain, "arch": arch, "heads": heads, "onnx": target, "inputs": inputs}
        spec |= {"batch_sizes": sizes, "seed": seed, "opset": opset}
        job = export_job.start(lambda folder: export_job.export_spec(**spec, folder=folder))
    try:
        from mmsurgery.verify.gate import run_gate

        return run_gate(
            plain,
            against=against,
            onnx=onnx,
            arch=arch,
            inputs=inputs,
            sizes=sizes,
            atol=atol,
            rtol=rtol,
            max_latency_ratio=max_latency_ratio,
            heads=heads,
            opset=opset,
            seed=seed,
            latency_warmup=latency_warmup,
            latency_runs=latency_runs,
            weights_ulps=weights_ulps,
            export=job,
            started=started,
        )
    finally:
        if job is not None:
            job.close()
