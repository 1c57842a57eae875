"""`--arch hf_vit_arch:build` for the tests: a tiny Hugging Face `ViTForImageClassification`, whose key names
(`vit.layers.0.attention.q_proj`, `classifier`, ...) differ from the built-in ViT's. The tests folder is on
sys.path (pyproject's pytest `pythonpath`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

IMAGE, PATCH, HIDDEN, LAYERS, HEADS, MLP, LABELS = 16, 4, 32, 2, 2, 64, 5


def config():
    import transformers

    return transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=LABELS,
    )


def build(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
    import transformers

    return transformers.ViTForImageClassification(config())


def example_input(batch_size: int, generator: torch.Generator) -> Tensor:
    return torch.randn(batch_size, 3, IMAGE, IMAGE, generator=generator)
