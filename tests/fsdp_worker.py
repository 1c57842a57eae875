"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node=2`: a tiny ViT with the pathway under FSDP2 (gloo).

Trains a few steps with `fully_shard`, then on every rank checks the `torch.distributed.checkpoint` state-dict
APIs on the attached, sharded model and `pathway.scales` on a subset of ranks; writes into OUT:
  dcp/                  `dcp.save(get_model_state_dict(model))`: the sharded model
  dcp_train/            `dcp.save({"model": ..., "optim": get_optimizer_state_dict(...)})`
  full.paired.safetensors   rank 0: `get_model_state_dict(full_state_dict=True, cpu_offload=True)`
  scales.json           rank 0: λ per layer, `scales(model)` on rank 0 alone
Exits non-zero on failure; prints FSDP_OK on success.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from pathway_fixtures import batch, make_paired_state, tiny_vit
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from mmsurgery.checkpoint import write_safetensors
from mmsurgery.errors import BadInputError
from mmsurgery.pathway import attach, param_groups, scales

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets every tensor, others nothing


def sharded_vit(seed: int, aux_seed: int) -> torch.nn.Module:
    model = tiny_vit(seed=seed)
    attach(model, make_paired_state(model, seed=aux_seed))
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    failures: list[str] = []

    model = sharded_vit(0, 1)  # same seeds on every rank, as a real run initialises
    opt = torch.optim.AdamW(param_groups(model, 0.05, lr=1e-2))
    x, y = batch(n=8, seed=100 + rank)  # different data per rank
    model.train()
    for _ in range(args.steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()

    # scales: no collective by default, so rank 0 alone may call it; a rank without λ gets a clear error
    gathered = scales(model, gather=True)  # a collective, on every rank
    if rank == 0:
        local = scales(model)
        if local != gathered:
            failures.append(f"rank 0: scales() {local} != scales(gather=True) {gathered}")
        (args.out / "scales.json").write_text(json.dumps(local))
    else:
        try:
            scales(model)
            failures.append(f"rank {rank}: scales() read λ this rank does not hold")
        except BadInputError as e:
            if "gather=True" not in str(e):
                failures.append(f"rank {rank}: unclear error {e}")
    dist.barrier()  # rank 0 called scales() alone above: had it been a collective, this would hang
    if not gathered or not all(v != 0.0 for v in gathered.values()):
        failures.append(f"rank {rank}: some λ did not train: {gathered}")

    sharded = get_model_state_dict(model)
    if list(sharded) != list(model.state_dict()) or not all(isinstance(v, DTensor) for v in sharded.values()):
        failures.append(f"rank {rank}: get_model_state_dict is not the sharded model.state_dict()")
    dcp.save(sharded, checkpoint_id=args.out / "dcp")
    dcp.save({"model": sharded, "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=args.out / "dcp_train")
    full = get_model_state_dict(model, options=FULL)
    if rank == 0:
        if not all(type(v) is torch.Tensor for v in full.values()):
            failures.append("rank 0: the full state dict holds DTensors")
        write_safetensors(args.out / "full.paired.safetensors", full)
    elif full:
        failures.append(f"rank {rank}: cpu_offload full state dict is not empty")

    # back in: dcp.load into another sharded model, and set_model_state_dict from the full state on every rank
    other = sharded_vit(5, 9)
    state = get_model_state_dict(other)
    dcp.load(state, checkpoint_id=args.out / "dcp")
    set_model_state_dict(other, state)
    back = get_model_state_dict(other, options=FULL)
    if rank == 0 and not same_state(back, full):
        failures.append("rank 0: dcp.load + set_model_state_dict did not restore the trained model")
    everywhere = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    third = sharded_vit(6, 10)
    set_model_state_dict(third, everywhere, options=StateDictOptions(full_state_dict=True))
    back = get_model_state_dict(third, options=FULL)
    if rank == 0 and not same_state(back, full):
        failures.append("rank 0: set_model_state_dict(full_state_dict=True) did not restore the trained model")

    dist.barrier()
    dist.destroy_process_group()
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"FSDP_OK rank {rank}")
    return 0


if __name__ == "__main__":
    # Every check ran and the group is destroyed; leave without interpreter finalization, where gloo's worker
    # threads can still abort the process ("terminate called without an active exception", SIGABRT, seen
    # twice in CI after both ranks had printed their OK line; pytorch/pytorch#190489, #179291).
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
