"""The pathway's tensors under FSDP2 (`fully_shard`), where W_aux and λ are DTensors sharded on dim 0: a full
tensor sharded like a parameter without communication (`shard_like`), λ's values as this rank holds them
(`local_values`). torch.distributed is imported only where it exists and is needed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["local_values", "shard_like"]


def _dtensor_type() -> type | None:
    """torch's `DTensor`, or None where torch was built without torch.distributed."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_like(param: Tensor, value: Any) -> Any:
    """`value` sharded like `param` where `param` is a DTensor and `value` the full plain tensor; else `value`."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor) or not isinstance(value, Tensor) or isinstance(value, dtensor):
        return value
    if value.shape != param.shape:
        return value  # load_state_dict reports the shape mismatch
    from torch.distributed.tensor import distribute_tensor

    local = value.detach().to(param.device)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)


def local_values(scale: Tensor, gather: bool) -> list[float] | None:
    """λ's values: a plain tensor's; a DTensor's from this rank's shard where that shard is the whole (replicated,
    or sharded with this rank holding every element), all-gathered if `gather`; otherwise None."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(scale, dtensor):
        return scale.reshape(-1).tolist()
    if gather:
        return scale.full_tensor().reshape(-1).tolist()
    local = scale.to_local()
    whole = all(p.is_replicate() or p.is_shard() for p in scale.placements) and local.shape == scale.shape
    return local.reshape(-1).tolist() if whole else None
