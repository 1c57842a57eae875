"""Tiny ViTs and synthetic paired state dicts for the pathway tests (random aux, λ = 0)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsurgery.models.vit import VisionTransformer, ViTConfig
from mmsurgery.pathway import param_groups

TINY = ViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def tiny_config(**overrides: Any) -> ViTConfig:
    return dataclasses.replace(TINY, **overrides)


def tiny_vit(seed: int = 0, **overrides: Any) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(tiny_config(**overrides)).eval()


def make_paired_state(
    model: nn.Module, *, seed: int = 1, aux_std: float = 0.02, linears: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """The model's plain state dict plus a random `P.aux_weight` and a zero `P.cross_modal_scale` per linear."""
    names = list(linears) if linears is not None else model.block_linear_names()  # type: ignore[operator]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        weight = state[f"{name}.weight"]
        state[f"{name}.aux_weight"] = (torch.randn(weight.shape, generator=gen) * aux_std).to(weight.dtype)
        state[f"{name}.cross_modal_scale"] = torch.zeros(1)
    return state


def batch(cfg: ViTConfig = TINY, n: int = 8, seed: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    y = torch.randint(0, max(cfg.num_classes, 1), (n,), generator=gen)
    return x, y


def train_steps(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps with `param_groups`; returns the losses."""
    opt = torch.optim.AdamW(param_groups(model, 0.05, lr=lr), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def state_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def tiny_pair(
    folder: Path, *, target: str = "target.safetensors", aux: str = "aux.safetensors", paired: str = "p.safetensors"
) -> Path:
    """A tiny ViT target (seed 0) and auxiliary (seed 1) saved in `folder`, and their paired file (`--heads 2`,
    λ = 0): the starting point the verify and CLI tests share."""
    from safetensors.torch import save_file

    from mmsurgery.pairing import pair

    save_file(tiny_vit(0).state_dict(), folder / target)
    save_file(tiny_vit(1).state_dict(), folder / aux)
    return pair(folder / target, folder / aux, folder / paired, heads=2).output


def trained_like(paired: Path, out: Path, *, seed: int = 2, lam: float | None = None, sign: float = 1.0) -> Path:
    """`paired` as training leaves it, saved to `out` with its metadata: by default λ ~ 0.2 + N(0, 0.3²) (times
    `sign`) and every other tensor moved by N(0, 0.01²) (no all-ones LayerNorm or zero bias left for an exporter
    to fold away); with `lam`, λ = `lam` in every pathway and nothing else changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(paired, "pt") as f:
        meta = dict(f.metadata() or {})
    sd = load_file(paired)
    g = torch.Generator().manual_seed(seed)
    for k in sd:
        if k.endswith("cross_modal_scale"):
            sd[k] = torch.full_like(sd[k], lam) if lam is not None else sign * (torch.randn(1, generator=g) * 0.3 + 0.2)
        elif lam is None:
            sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, out, metadata=meta)
    return out
