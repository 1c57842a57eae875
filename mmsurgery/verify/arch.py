"""Architectures verify can build from a checkpoint: the built-in ViT, a Hugging Face model from its `config.json`
(`hf`, in `verify.hf_arch`), or any `MODULE:CALLABLE` factory.

The factory contract (docs/verify.md): `factory(state_dict, metadata) -> nn.Module` returns the architecture
with any weights (verify loads the checkpoint into it with `strict=True`); `example_input(batch_size, generator)`
makes seeded inputs, found as a method of the returned module or as a function of the factory's module (or
replaced by `--inputs FILE`); the cost reference is `factory(state_dict, {})` with PLAIN's weights loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from mmsurgery.errors import BadInputError, one_line
from mmsurgery.hf import to_model_names
from mmsurgery.models.vit import VisionTransformer, ViTConfig, config_from_state_dict, inferred_fields

__all__ = ["Arch", "Example", "FactoryArch", "VitArch", "factory_arch"]

ExampleInput = Callable[[int, torch.Generator], Tensor]
Example = Tensor | tuple[Tensor, ...]  # one batch: the forward's positional tensors


class Arch:
    """How to build the model of a checkpoint, a plain reference of the same configuration, and inputs for it."""

    name: str
    reference_note: str
    meta_flops: bool = False  # FLOPs are a function of shapes alone: the cost stage counts them on meta models

    def build(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        """The architecture of `state` (weights not loaded; the caller loads them strictly, with `assign=True`, so
        its own parameters may be left unallocated)."""
        raise NotImplementedError

    def skeleton(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        """The architecture of `state` for its shapes, configuration and example inputs only (`state` may hold
        meta tensors: names, shapes and dtypes without data). By default `build`."""
        return self.build(state, metadata)

    def reference(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        """A plain model of the same configuration (the caller loads PLAIN's weights): what it must cost."""
        raise NotImplementedError

    def load(self, model: nn.Module, state: Mapping[str, Tensor], *, assign: bool = False) -> None:
        """Load a checkpoint's `state` into `model` strictly (`RuntimeError` if it does not fit), its names converted
        by `mmsurgery.hf.to_model_names` (on-disk Hugging Face names; the identity for other models). `assign`:
        the model takes `state`'s tensors as its parameters instead of copying them (one copy of the weights)."""
        model.load_state_dict(to_model_names(model, state), strict=True, assign=assign)

    def state_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """The keys (model names) and shapes a checkpoint of `model` holds: what the keys stage expects."""
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def runnable(self, model: nn.Module) -> nn.Module:
        """The module verify calls, exports and times: `model` itself unless its output needs picking."""
        return model

    def graph_names(self, runnable: nn.Module) -> tuple[list[str] | None, list[str] | None]:
        """ONNX input and output names for the export of `runnable` (None: the exporter's own)."""
        return None, None

    def example_input(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> Example | None:
        """A seeded input batch for `model` (a tensor, or a tuple of the forward's positional tensors), or None
        when the architecture cannot make one."""
        raise NotImplementedError

    def inputs_from_file(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> Example:
        """The forward's inputs from an `--inputs` file's tensors (`input` is always there)."""
        return tensors["input"]

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """The model's configuration, flat; the cost stage requires PLAIN's to equal the reference's."""
        return {}

    def config_inferred(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
        """The configuration fields the architecture would guess for this checkpoint rather than read (name → the
        guessed value); empty when everything is known. `state` may hold meta tensors."""
        return {}

    def same_graph(self, plain: nn.Module, reference: nn.Module) -> bool:
        """Whether exporting `reference` must give PLAIN's graph (same code, same configuration, same weights),
        so verify exports once. False unless the architecture can prove it; a factory's code is the user's."""
        return False


class VitArch(Arch):
    """The built-in timm-named ViT (`mmsurgery.models.vit`): config from shapes, `--heads` and `mmsurgery.vit`."""

    name = "vit"
    meta_flops = True
    reference_note = "ViTConfig inferred from PLAIN's shapes with exact GELU (gelu_approximate='none'), PLAIN's weights"

    def __init__(self, num_heads: int | None = None) -> None:
        self.num_heads = num_heads

    def config(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> ViTConfig:
        return config_from_state_dict(state, num_heads=self.num_heads, metadata=metadata)

    def build(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        return _on_meta(self.config(state, metadata))

    def reference(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        return _on_meta(dataclasses.replace(self.config(state, metadata), gelu_approximate="none"))

    def example_input(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> Tensor | None:
        cfg: ViTConfig = model.config  # type: ignore[assignment]
        return torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        cfg = getattr(model, "config", None)
        return cfg.to_dict() if isinstance(cfg, ViTConfig) else {}

    def config_inferred(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
        """`num_heads` unless `--heads` gives it or the `mmsurgery.vit` metadata records it (not marked inferred):
        the head-dim-64 rule's guess. Empty as well when no config can be built (the keys stage says why)."""
        fields = inferred_fields(self.num_heads, metadata)
        if not fields:
            return {}
        try:
            config = self.config(state, metadata)
        except BadInputError:
            return {}
        return {name: getattr(config, name) for name in fields}

    def same_graph(self, plain: nn.Module, reference: nn.Module) -> bool:
        """The built-in ViT's forward is a function of its `ViTConfig` alone: two exact `VisionTransformer`s with
        equal configs (and, as verify loads them, the same weights) export to the same graph."""
        return (
            type(plain) is VisionTransformer
            and type(reference) is VisionTransformer
            and plain.config == reference.config
        )


def _on_meta(config: ViTConfig) -> VisionTransformer:
    """A `VisionTransformer` whose parameters are meta tensors (no memory): verify always loads a checkpoint into
    it strictly with `assign=True`, which replaces every parameter, so a random init (~1 s per ViT-S) or even an
    allocation would be thrown away. The built-in ViT has no buffers, so nothing outside its state dict is left
    without data."""
    with torch.device("meta"):
        return VisionTransformer(config)


class FactoryArch(Arch):
    """A user architecture: `factory(state_dict, metadata) -> nn.Module` from `package.module:callable`."""

    reference_note = "factory(state_dict, {}) with PLAIN's weights loaded"

    def __init__(self, spec: str, module: ModuleType, factory: Callable[..., Any]) -> None:
        self.name = spec
        self.module = module
        self.factory = factory

    def _call(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        try:
            with torch.random.fork_rng(devices=[]):
                model = self.factory(state, metadata)
        except Exception as exc:
            raise BadInputError(
                f"--arch {self.name}: the factory raised {type(exc).__name__}: {one_line(str(exc))}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise BadInputError(f"--arch {self.name}: the factory returned {type(model).__name__}, not an nn.Module")
        return model

    def build(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        return self._call(state, metadata)

    def reference(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        return self._call(state, {})

    def example_input(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> Example | None:
        make = getattr(model, "example_input", None) or getattr(self.module, "example_input", None)
        if not callable(make):
            return None
        x = make(batch_size, generator)
        if isinstance(x, (tuple, list)) and x and all(isinstance(t, Tensor) for t in x):
            return tuple(x)
        if not isinstance(x, Tensor):
            raise BadInputError(
                f"--arch {self.name}: example_input returned {type(x).__name__}, not a Tensor or a tuple of Tensors"
            )
        return x


def factory_arch(spec: str) -> FactoryArch:
    """`"package.module:factory"` (an attribute path allowed after the colon) → that factory; one that cannot be
    imported, is missing or is not callable raises `BadInputError`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BadInputError(f"--arch {spec!r}: use 'vit', 'hf' or 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise BadInputError(
            f"--arch {spec}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
            "is the package installed or on PYTHONPATH?"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInputError(f"--arch {spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInputError(f"--arch {spec}: {attr!r} is a {type(obj).__name__}, not a callable")
    return FactoryArch(spec, module, obj)
