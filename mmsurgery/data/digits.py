"""scikit-learn's 8x8 digits as image tensors for a ViT, with fixed train/val/test splits.

Used by `examples/finetune.py`, the demo and the reproduction scripts, so that they all see the same
images and the same splits. The data ships with scikit-learn (no download).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mmsurgery.errors import BadInputError

__all__ = ["NUM_CLASSES", "DigitsSplits", "load_digits_tensors"]

NUM_CLASSES = 10
_SIDE = 8


class DigitsSplits(NamedTuple):
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def _to_images(raw: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """[N, 8, 8] in 0..16 → [N, C, S, S] in [-1, 1]: nearest upsampling by the largest integer factor, then
    centred zero padding (the digits' own background), then channel replication."""
    factor = img_size // _SIDE
    x = (raw / 16.0).unsqueeze(1)
    if factor > 1:
        x = F.interpolate(x, scale_factor=factor, mode="nearest")
    pad = img_size - x.shape[-1]
    x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return ((x - 0.5) / 0.5).expand(-1, in_chans, -1, -1).contiguous()


def load_digits_tensors(
    img_size: int, in_chans: int = 3, split_seed: int = 0, *, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> DigitsSplits:
    """The 1797 digits as float32 images `[N, in_chans, img_size, img_size]` and int64 labels 0..9.

    Splits are a random permutation fixed by `split_seed` (the same on every machine): `test_fraction` test,
    `val_fraction` validation, the rest training (1258 / 180 / 359 by default).
    """
    if img_size < _SIDE:
        raise BadInputError(f"img_size must be at least {_SIDE} for 8x8 digits, got {img_size}")
    if in_chans < 1 or not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise BadInputError("need in_chans >= 1 and val_fraction + test_fraction < 1")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise BadInputError("the digits data needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    images = _to_images(torch.as_tensor(digits.images, dtype=torch.float32), img_size, in_chans)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(len(labels) * test_fraction)
    n_val = round(len(labels) * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return DigitsSplits(*(TensorDataset(images[idx], labels[idx]) for idx in (train, val, test)))
