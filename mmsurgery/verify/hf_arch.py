"""`--arch hf`: the Hugging Face model a `config.json` describes, built by transformers from that config.

The config is read from PLAIN's folder (or the folder of PLAIN's file), else from PAIRED's. The model class is the
one the config's `architectures` names (what `save_pretrained` recorded), else the base `AutoModel` class of the
config. Checkpoints keep the on-disk names `save_pretrained` writes; `mmsurgery.hf.to_model_names` converts them
where a state meets the model. verify compares, exports and times one tensor, `logits` (else `last_hidden_state`),
through `HfForward`. Example inputs come from the config: `pixel_values [B, num_channels, image_size, image_size]`
for vision models, `input_ids` in `[0, vocab_size)` of a fixed length (plus a seeded, right-padded
`attention_mask` when the forward takes one) for text models.

Models are built without initialising their weights (`transformers.initialization.no_init_weights`, what
transformers itself uses before loading): verify loads every tensor afterwards. Not on the meta device: `to_empty`
would leave non-persistent buffers (BERT's `position_ids`, rotary `inv_freq`) as garbage, and those are in no
checkpoint to load them from. transformers is imported here only, and only for `--arch hf`.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsurgery.errors import BadInputError, one_line
from mmsurgery.hf import CONFIG_NAME, to_model_names
from mmsurgery.verify.arch import Arch

__all__ = ["HfArch", "HfForward", "find_config"]

TEXT_LENGTH = 16  # tokens per example row, capped at the config's max_position_embeddings
OUTPUTS = ("logits", "last_hidden_state")  # the output verify compares: the first one the model returns


def find_config(checkpoints: Sequence[str | os.PathLike[str] | None]) -> Path:
    """`config.json` in the folder of the first checkpoint that has one (a folder is its own folder)."""
    tried: list[str] = []
    for ck in checkpoints:
        if ck is None:
            continue
        p = Path(ck)
        if not p.exists():  # the message open_checkpoint would give, before a misleading "no config.json"
            raise BadInputError(f"{p}: no such file or folder")
        folder = p if p.is_dir() else p.parent
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
        if str(folder) not in tried:
            tried.append(str(folder))
    raise BadInputError(
        f"--arch hf: no {CONFIG_NAME} in {' or '.join(tried) or 'the checkpoint folder'}; --arch hf builds the "
        "model from the Hugging Face config save_pretrained writes (copy it next to PLAIN or PAIRED)"
    )


class HfForward(nn.Module):
    """Calls the Hugging Face `model` with positional tensors as `input_names` and returns one tensor: `logits`,
    else `last_hidden_state`. What verify runs, exports and times; `output_name` is set by the first call."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], options: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.options = dict(options)
        self.output_name: str | None = None

    def forward(self, *inputs: Tensor) -> Tensor:
        out = self.model(**dict(zip(self.input_names, inputs, strict=True)), **self.options)
        if isinstance(out, Mapping):  # a ModelOutput
            name = next((n for n in OUTPUTS if isinstance(out.get(n), Tensor)), None)
            if name is None:
                raise BadInputError(
                    f"--arch hf: {type(self.model).__name__} returns neither {' nor '.join(OUTPUTS)} "
                    f"(it returns {', '.join(out.keys())}); verify compares one of those"
                )
            tensor = out[name]
        else:  # return_dict=False in the config: the first element is logits or last_hidden_state
            name, tensor = "output", out[0]
        if self.output_name != name:
            self.output_name = name
        return tensor


class HfArch(Arch):
    """A transformers model from `config.json`: see the module docstring."""

    name = "hf"

    def __init__(self, config_file: Path) -> None:
        import transformers

        self.config_file = config_file
        try:
            self.config = transformers.AutoConfig.from_pretrained(os.fspath(config_file.parent))
        except Exception as exc:  # unknown model_type, malformed JSON, ...
            raise BadInputError(
                f"{config_file}: transformers cannot read it ({type(exc).__name__}: {one_line(str(exc))})"
            ) from exc
        self.model_class = _model_class(transformers, self.config, config_file)
        self.reference_note = (
            f"a fresh {self.model_class.__name__} from {config_file}, PLAIN's weights loaded (transformers "
            f"{transformers.__version__})"
        )

    def _new(self) -> nn.Module:
        from transformers.initialization import no_init_weights

        try:
            with no_init_weights():
                model = self.model_class(copy.deepcopy(self.config))
        except Exception as exc:
            raise BadInputError(
                f"--arch hf: transformers cannot build {self.model_class.__name__} from {self.config_file} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        model.tie_weights()  # init_weights, which ties, was skipped
        return model

    def build(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        return self._new()

    def reference(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        return self._new()

    @staticmethod
    def _tied(model: nn.Module) -> set[str]:
        """Keys `save_pretrained` leaves out because they are tied to another (GPT-2's `lm_head.weight`)."""
        return set(getattr(model, "all_tied_weights_keys", None) or {})

    def skeleton(self, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> nn.Module:
        """On the meta device: shapes and config only (the garbage buffers `to_empty` would leave do not matter
        to a model that is never run)."""
        from transformers.initialization import no_init_weights

        try:
            with torch.device("meta"), no_init_weights():
                model = self.model_class(copy.deepcopy(self.config))
            model.tie_weights()
            return model
        except Exception:  # a model that cannot be built on meta: build it for real (or say why not)
            return self._new()

    def load(self, model: nn.Module, state: Mapping[str, Tensor], *, assign: bool = False) -> None:
        """Strict, except that a tied key may be absent (it shares its source's tensor, which must be there)."""
        named = to_model_names(model, state)
        tied = self._tied(model)
        expected = set(model.state_dict())
        missing = sorted(k for k in expected - named.keys() if k not in tied)
        unexpected = sorted(named.keys() - expected)
        if missing or unexpected:
            parts = [f"Missing key(s): {', '.join(missing[:5])}"] if missing else []
            parts += [f"Unexpected key(s): {', '.join(unexpected[:5])}"] if unexpected else []
            raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: {'; '.join(parts)}")
        model.load_state_dict(named, strict=False, assign=assign)  # every key checked above; shapes still raise
        if assign and tied:
            model.tie_weights()  # assigning replaced the parameter a tied key shares

    def state_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        tied = self._tied(model)
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}

    def _input_names(self, model: nn.Module) -> tuple[str, ...]:
        main = getattr(model, "main_input_name", "input_ids")
        if main == "input_ids" and "attention_mask" in _forward_parameters(model):
            return ("input_ids", "attention_mask")
        return (main,)

    def runnable(self, model: nn.Module) -> nn.Module:
        options = {"use_cache": False} if "use_cache" in _forward_parameters(model) else {}
        return HfForward(model, self._input_names(model), options)

    def graph_names(self, runnable: nn.Module) -> tuple[list[str] | None, list[str] | None]:
        if not isinstance(runnable, HfForward):
            return None, None
        return list(runnable.input_names), [runnable.output_name] if runnable.output_name else None

    def example_input(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        names = self._input_names(model)
        config = model.config  # type: ignore[union-attr]
        if names[0] == "pixel_values":
            vision = getattr(config, "vision_config", None) or config
            size, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", 3)
            if size is None:
                raise BadInputError(f"--arch hf: {self.config_file} has no image_size; pass --inputs FILE")
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            return (torch.randn(batch_size, channels, h, w, generator=generator),)
        if names[0] == "input_ids":
            text = config.get_text_config()
            vocab = getattr(text, "vocab_size", None)
            if not vocab:
                raise BadInputError(f"--arch hf: {self.config_file} has no vocab_size; pass --inputs FILE")
            length = min(TEXT_LENGTH, getattr(text, "max_position_embeddings", None) or TEXT_LENGTH)
            ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
            if len(names) == 1:
                return (ids,)
            lengths = torch.randint(length // 2 + 1, length + 1, (batch_size,), generator=generator)
            lengths[0] = length  # one row without padding
            return ids, (torch.arange(length) < lengths[:, None]).to(torch.int64)
        raise BadInputError(
            f"--arch hf: {type(model).__name__} takes {names[0]}; verify makes inputs for pixel_values and "
            "input_ids models only: pass --inputs FILE (a safetensors file with a batch-first tensor 'input')"
        )

    def inputs_from_file(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """`input` is the main input (`pixel_values` or `input_ids`); `attention_mask` is taken from the file when
        there, else all ones."""
        names = self._input_names(model)
        x = tensors["input"]
        if len(names) == 1:
            return (x,)
        mask = tensors.get("attention_mask")
        if mask is None:
            return x, torch.ones_like(x, dtype=torch.int64)
        if tuple(mask.shape) != tuple(x.shape):
            raise BadInputError(
                f"--inputs: 'attention_mask' has shape {list(mask.shape)}, 'input' {list(x.shape)}; they must match"
            )
        return x, mask

    def describe(self, model: nn.Module) -> dict[str, Any]:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_diff_dict"):
            return {}
        flat = {k: v for k, v in config.to_diff_dict().items() if isinstance(v, (bool, int, float, str))}
        return {"model_class": type(model).__name__, **flat}

    def same_graph(self, plain: nn.Module, reference: nn.Module) -> bool:
        """Both built here by the same class from the same config (and loaded with the same weights): transformers'
        forward is a function of the class and its config, so the reference exports to PLAIN's graph."""
        return (
            type(plain) is self.model_class
            and type(reference) is self.model_class
            and plain.config.to_dict() == reference.config.to_dict()  # type: ignore[union-attr]
        )


def _model_class(transformers: Any, config: Any, config_file: Path) -> type[nn.Module]:
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        try:
            return transformers.MODEL_MAPPING[type(config)]
        except KeyError:
            raise BadInputError(
                f"{config_file}: no architectures entry, and transformers has no AutoModel for {type(config).__name__}"
            ) from None
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise BadInputError(
            f"{config_file}: architectures names {names[0]!r}, which transformers {transformers.__version__} does "
            "not have (custom code is not loaded: use --arch package.module:factory)"
        )
    return cls


def _forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
