"""A small classification training loop, shared by the demo and the experiments.

Nothing here is specific to the pathway: optimizer groups come from `pathway.param_groups`, so λ gets no
weight decay and its own learning-rate multiplier; a model without pathway trains the same way. It reports
progress through a callback and never prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mmsurgery.pathway import param_groups

__all__ = ["TrainConfig", "accuracy", "train_classifier"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    scale_lr_mult: float = 1.0  # λ's learning rate = lr × this (1.0: the paper's setting)
    warmup_fraction: float = 0.1  # linear warm-up, then cosine decay to 0
    seed: int = 0
    fused: bool = True  # torch's fused AdamW: one kernel over all tensors, so a trainable W_aux costs ~nothing


def train_classifier(
    model: nn.Module,
    train: Dataset,
    config: TrainConfig,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train with AdamW + warm-up/cosine; returns the loss of every step. `on_step(step, total, loss)`.

    AdamW is torch's fused implementation unless `config.fused` is False (a device without it): the per-tensor
    default loops over every parameter in Python, which makes the doubled parameter count of a trainable W_aux
    show in the step time (docs/benchmarks.md, training overhead).
    """
    loader = DataLoader(
        train,
        batch_size=config.batch_size,
        sampler=RandomSampler(train, generator=torch.Generator().manual_seed(config.seed)),
        drop_last=len(train) > config.batch_size,  # type: ignore[arg-type]
    )
    total = config.epochs * len(loader)
    warmup = max(1, int(config.warmup_fraction * total))
    groups = param_groups(model, config.weight_decay, lr=config.lr, scale_lr_mult=config.scale_lr_mult)
    opt = torch.optim.AdamW(groups, lr=config.lr, fused=config.fused or None)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    model.train()
    for _ in range(config.epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(losses), total, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    correct = count = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(-1) == y).sum())
        count += len(y)
    return correct / max(count, 1)
