"""Options and inputs of a verify run, checked before anything expensive: batch sizes, the `--onnx` value,
`--inputs FILE`, and the seeded example inputs (one fresh `torch.Generator().manual_seed(seed)` per batch size).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.errors import BadInputError
from mmsurgery.verify import onnx_stage
from mmsurgery.verify.arch import Arch
from mmsurgery.verify.options import onnx_target, parse_batch_sizes

__all__ = ["check_onnx_option", "make_inputs", "parse_batch_sizes", "read_inputs"]


def check_onnx_option(onnx: str | os.PathLike[str] | bool | None) -> Path | bool | None:
    """`options.onnx_target`, and an existing file must parse as an ONNX model."""
    target = onnx_target(onnx)
    if isinstance(target, Path) and target.exists():
        onnx_stage.probe_onnx_file(target)
    return target


def read_inputs(path: str | os.PathLike[str], batch_sizes: Sequence[int]) -> Tensor:
    p = Path(path)
    with open_checkpoint(p) as ck:  # any checkpoint format; a missing or damaged file is a BadInputError
        if "input" not in ck:
            raise BadInputError(f"--inputs {p}: no tensor named 'input' (found {sorted(ck.keys())[:5]})")
        x = ck.get("input")
    if x.ndim == 0 or x.shape[0] < max(batch_sizes):
        raise BadInputError(
            f"--inputs {p}: 'input' has shape {list(x.shape)}; its first (batch) dimension must be at least "
            f"{max(batch_sizes)}, the largest --batch-sizes"
        )
    return x.float() if x.is_floating_point() else x


def make_inputs(
    arch: Arch, model: nn.Module, batch_sizes: Sequence[int], seed: int, given: Tensor | None
) -> dict[int, Tensor]:
    if given is not None:
        return {b: given[:b].contiguous() for b in batch_sizes}
    out: dict[int, Tensor] = {}
    for b in batch_sizes:
        x = arch.example_input(model, b, torch.Generator().manual_seed(seed))
        if x is None:
            raise BadInputError(
                f"--arch {arch.name}: no example_input(batch_size, generator) on the model or its module; "
                "define one or pass --inputs FILE (a safetensors file with a batch-first tensor named 'input')"
            )
        out[b] = x
    return out
