"""Options and inputs of a verify run, checked before anything expensive: batch sizes, the `--onnx` value,
`--inputs FILE`, and the seeded example inputs (one fresh `torch.Generator().manual_seed(seed)` per batch size).
A batch is a tuple of the forward's positional tensors (one for the built-in ViT; `input_ids` and
`attention_mask` for a Hugging Face text model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.errors import BadInputError
from mmsurgery.verify import onnx_backend
from mmsurgery.verify.arch import Arch, Example

__all__ = ["as_args", "check_onnx_option", "first_rows", "make_inputs", "parse_batch_sizes", "read_inputs"]


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
    if len(sizes) < 2 or any(not 1 <= b <= onnx_backend.MAX_BATCH for b in sizes):
        raise BadInputError(
            f"--batch-sizes {value!r}: give at least two distinct batch sizes between 1 and {onnx_backend.MAX_BATCH}"
        )
    return tuple(sizes)


def check_onnx_option(onnx: str | os.PathLike[str] | bool | None) -> Path | bool | None:
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
        onnx_backend.probe_onnx_file(path)
    elif not path.parent.is_dir():
        raise BadInputError(f"--onnx {path}: folder {path.parent} does not exist")
    return path


def read_inputs(path: str | os.PathLike[str], batch_sizes: Sequence[int]) -> dict[str, Tensor]:
    """Every tensor of an `--inputs` file (floating ones as float32); `input` must be there, and every tensor must
    have at least the largest batch size as its first dimension. The architecture picks what it feeds
    (`Arch.inputs_from_file`: `input`, and for `--arch hf` text models an optional `attention_mask`)."""
    p = Path(path)
    with open_checkpoint(p) as ck:  # any checkpoint format; a missing or damaged file is a BadInputError
        if "input" not in ck:
            raise BadInputError(f"--inputs {p}: no tensor named 'input' (found {sorted(ck.keys())[:5]})")
        tensors = ck.to_state_dict()
    for name, x in tensors.items():
        if x.ndim == 0 or x.shape[0] < max(batch_sizes):
            raise BadInputError(
                f"--inputs {p}: {name!r} has shape {list(x.shape)}; its first (batch) dimension must be at least "
                f"{max(batch_sizes)}, the largest --batch-sizes"
            )
    return {name: x.float() if x.is_floating_point() else x for name, x in tensors.items()}


def as_args(x: Example) -> tuple[Tensor, ...]:
    """One batch as the forward's positional tensors."""
    return (x,) if isinstance(x, Tensor) else tuple(x)


def first_rows(x: Sequence[Tensor], n: int) -> tuple[Tensor, ...]:
    return tuple(t[:n].contiguous() for t in x)


def make_inputs(
    arch: Arch, model: nn.Module, batch_sizes: Sequence[int], seed: int, given: Mapping[str, Tensor] | None
) -> dict[int, tuple[Tensor, ...]]:
    """batch size → the forward's positional tensors: the first rows of `given` (an `--inputs` file's tensors),
    else the architecture's seeded `example_input` (a fresh generator seeded with `seed` per batch size)."""
    if given is not None:
        full = as_args(arch.inputs_from_file(model, given))
        return {b: first_rows(full, b) for b in batch_sizes}
    out: dict[int, tuple[Tensor, ...]] = {}
    for b in batch_sizes:
        x = arch.example_input(model, b, torch.Generator().manual_seed(seed))
        if x is None:
            raise BadInputError(
                f"--arch {arch.name}: no example_input(batch_size, generator) on the model or its module; "
                "define one or pass --inputs FILE (a safetensors file with a batch-first tensor named 'input')"
            )
        out[b] = as_args(x)
    return out
