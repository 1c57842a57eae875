"""Run by tests/test_ddp.py under `torchrun --nproc_per_node=2`: a tiny ViT with the pathway under DDP (gloo).

Checks, on every rank, that every λ got a non-zero gradient at every step and that after the steps λ, W_aux
and a target weight are bit-identical across ranks. Exits non-zero on failure; prints DDP_OK on success.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pathway_fixtures import batch, make_paired_state, tiny_vit
from torch.nn.parallel import DistributedDataParallel

from mmsurgery.pathway import attach, param_groups, pathway_modules


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], t) for t in gathered)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--aux-frozen", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    plain = tiny_vit(seed=0)  # same seed on every rank; DDP also syncs at construction
    model = attach(plain, make_paired_state(plain), aux_trainable=not args.aux_frozen).train()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(model, 0.05, lr=1e-2))
    x, y = batch(n=8, seed=100 + rank)  # different data per rank
    failures: list[str] = []
    for step in range(args.steps):
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        for name, pw in pathway_modules(model).items():
            grad = pw.cross_modal_scale.grad
            if grad is None or grad.abs().item() == 0.0:
                failures.append(f"rank {rank} step {step}: λ of {name} has no gradient")
        opt.step()
    pathways = pathway_modules(model)
    lambdas = torch.cat([pw.cross_modal_scale.detach() for pw in pathways.values()])
    if not (lambdas != 0).all():
        failures.append(f"rank {rank}: some λ did not move: {lambdas.tolist()}")
    if not _same_on_all_ranks(lambdas):
        failures.append(f"rank {rank}: λ differ across ranks")
    aux = pathways["blocks.1.mlp.fc2"].aux_weight.detach()
    if not _same_on_all_ranks(aux):
        failures.append(f"rank {rank}: W_aux differs across ranks")
    if not _same_on_all_ranks(model.state_dict()["blocks.0.attn.qkv.weight"]):
        failures.append(f"rank {rank}: W differs across ranks")
    # Tear down together: a rank destroying the group while the other still talks to it can abort in gloo
    # ("terminate called without an active exception", seen once in CI).
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"DDP_OK rank {rank} lambdas={lambdas.tolist()}")
    return 0


if __name__ == "__main__":
    # Every check ran and the group is destroyed; leave without interpreter finalization, where gloo's worker
    # threads can still abort the process ("terminate called without an active exception", SIGABRT, seen
    # twice in CI after both ranks had printed their OK line; pytorch/pytorch#190489, #179291).
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
