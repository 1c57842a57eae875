"""`transformers.Trainer` on a model with the pathway: λ in its own optimizer group, strict resume.

Trainer's default optimizer decays every parameter except biases and norms, so it decays λ (`cross_modal_scale`,
one scalar per linear, starting at 0), pulling the pathway shut, and λ shares everyone's learning rate.
`PathwayTrainer` overrides `create_optimizer`, the method Trainer's docs say to override for custom parameter groups:
the optimizer class and kwargs are the ones Trainer picks (`args.optim`, `args.optim_args`, or
`optimizer_cls_and_kwargs`); Trainer's own decay rule (`get_decay_parameter_names`, so an override of it applies)
splits the other parameters, so `W_aux` is decayed like any weight; λ gets a group of its own with no weight
decay and `lr × scale_lr_mult`. Trainer builds its scheduler on these groups, so λ follows the schedule.

Why a subclass rather than a function whose optimizer you pass as `Trainer(optimizers=(opt, None))`: Trainer
refuses `optimizers` under FSDP and with `model_init` (hyperparameter search), and an optimizer built outside
skips `args.optim`. `PathwayTrainerMixin` goes in front of any Trainer subclass (TRL's `SFTTrainer`, say):
`class MyTrainer(PathwayTrainerMixin, SFTTrainer)`.

It also makes `train(resume_from_checkpoint=...)` and `load_best_model_at_end` load an attached model strictly.
transformers 5 loads a checkpoint there with `load_state_dict(..., strict=False)` under the names
`save_pretrained` wrote, which differ from the model's own for many models (ViT's
`vit.encoder.layer.0.attention.attention.query` is `vit.layers.0.attention.q_proj` in memory), so most weights and
every λ stay as they were, with only a logged warning (transformers issue 43701). The mixin renames the keys with
`hf.to_model_names` and fails on any key missing or left over. PEFT models, DeepSpeed, FSDP and SageMaker keep
Trainer's own loading.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.errors import BadInputError
from mmsurgery.hf import to_model_names
from mmsurgery.integrations.peft import is_peft_model
from mmsurgery.pathway import is_attached, param_groups, pathway_modules

__all__ = ["PathwayTrainer", "PathwayTrainerMixin"]

log = logging.getLogger(__name__)
_OWN_GROUP_KWARGS = ("params", "model", "optimizer_dict")  # kwargs with which Trainer lets an optimizer group itself
_MAX_LISTED = 5


class PathwayTrainerMixin:
    """Trainer methods for a model with the pathway; put it before the Trainer class in the bases.

    `scale_lr_mult`: λ's learning rate is the optimizer's `lr` times this (1.0, the paper's setting, by default).
    A model without pathway trains exactly as with the plain Trainer.
    """

    def __init__(self, *args: Any, scale_lr_mult: float = 1.0, **kwargs: Any) -> None:
        if not (math.isfinite(scale_lr_mult) and scale_lr_mult > 0):
            raise BadInputError(f"scale_lr_mult={scale_lr_mult}: λ's lr multiplier must be a positive number")
        self.scale_lr_mult = float(scale_lr_mult)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None and is_attached(opt_model):
            self.optimizer = self._pathway_optimizer(opt_model)
        return super().create_optimizer(model)

    def _pathway_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        chosen = self.optimizer_cls_and_kwargs
        cls, kwargs = chosen if chosen is not None else self.get_optimizer_cls_and_kwargs(self.args, model)
        kwargs = dict(kwargs)
        own = [k for k in _OWN_GROUP_KWARGS if k in kwargs]
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or own:
            name = getattr(cls, "__name__", repr(cls)) + ("" if chosen is not None else f" (optim={self.args.optim!r})")
            raise BadInputError(
                f"optimizer {name} chooses its own parameter groups, so λ cannot get one without weight decay; use "
                "an optimizer class Trainer builds from parameter groups (adamw_torch, the default, adafactor, sgd, "
                "...), or build the optimizer yourself from pathway.param_groups(model)"
            )
        if is_peft_model(model) and any(
            p.requires_grad for pw in pathway_modules(model).values() for p in pw.parameters()
        ):
            log.warning(
                "λ or W_aux train alongside a PEFT adapter: PEFT's save_pretrained and Trainer's checkpoints hold the "
                "adapter only, without them; merge with mmsurgery.integrations.peft.merge_and_unload(model) to keep them"
            )
        groups = param_groups(  # Trainer's decay rule and weight decay; λ alone, no decay, lr × scale_lr_mult
            model,
            self.args.weight_decay,
            lr=kwargs.get("lr", self.args.learning_rate),
            scale_lr_mult=self.scale_lr_mult,
            decay_names=self.get_decay_parameter_names(model),
        )
        return cls(groups, **kwargs)

    def _loads_strictly(self, model: nn.Module) -> bool:
        from transformers.utils import is_sagemaker_mp_enabled

        distributed = getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
        return is_attached(model) and not is_peft_model(model) and not distributed and not is_sagemaker_mp_enabled()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.model if model is None else model
        if not self._loads_strictly(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_strictly(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._loads_strictly(self.model):
            return super()._load_best_model()
        _load_strictly(self.model, best)


class PathwayTrainer(PathwayTrainerMixin, Trainer):
    """`transformers.Trainer` for a model with the pathway: `PathwayTrainer(model, args, ..., scale_lr_mult=10)`."""


def _load_strictly(model: nn.Module, checkpoint: str | os.PathLike[str]) -> None:
    """Load a Trainer checkpoint folder (or any file `open_checkpoint` reads) into `model`, keys renamed to the
    model's with `hf.to_model_names`. Every key of `model.state_dict()` must be there, except a tied duplicate
    whose twin is (`save_pretrained` writes tied weights once), and nothing else; otherwise `BadInputError`,
    and nothing is loaded."""
    with open_checkpoint(checkpoint) as ck:
        state = to_model_names(model, ck.to_state_dict())
    own = model.state_dict()
    present = {_storage(own[k]) for k in own.keys() & state.keys()}
    missing = sorted(k for k in own.keys() - state.keys() if _storage(own[k]) not in present)
    unexpected = sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        shown = [
            *(f"missing {k}" for k in missing[:_MAX_LISTED]),
            *(f"unexpected {k}" for k in unexpected[:_MAX_LISTED]),
            *(f"{k} {list(state[k].shape)} != {list(own[k].shape)}" for k in reshaped[:_MAX_LISTED]),
        ]
        raise BadInputError(
            f"{checkpoint}: does not match {type(model).__name__} with its pathway ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} reshaped key(s): {', '.join(shown)}); nothing was loaded"
        )
    model.load_state_dict(state, strict=False)  # the keys were checked above; tied twins fill each other


def _storage(t: torch.Tensor) -> tuple[torch.device, int]:
    """Where a tensor's data lives: tied weights share it. An empty tensor has no address, so it is only itself."""
    ptr = t.untyped_storage().data_ptr()
    return (t.device, ptr if ptr else -id(t))
