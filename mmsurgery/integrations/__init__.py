"""Hugging Face integrations: `transformers.Trainer` and PEFT on a model with the pathway.

Each lives in its own submodule and imports its library there, so `import mmsurgery` (and this package) never
imports transformers or peft:

- `mmsurgery.integrations.trainer`: `PathwayTrainer` / `PathwayTrainerMixin` (λ in its own optimizer group, no
  weight decay, its own lr multiplier; strict resume of attached models);
- `mmsurgery.integrations.peft`: `merge_and_unload`, which folds the pathway under the adapters before PEFT merges
  them (PEFT's own merge into a pathway weight is lost).

docs/huggingface.md says how to use them and why.
"""

__all__: list[str] = []
