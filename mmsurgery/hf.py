"""Hugging Face model folders and checkpoint names.

Folders: a folder with a `config.json` (a `save_pretrained` folder, `mmsurgery pair`'s folder output, a Trainer
`checkpoint-N`) is a model folder; `pair` and `fold` given one write one, carrying its non-weight files
(`model_folder`).

Names: what a `save_pretrained` folder holds on disk vs what the model has in memory.

transformers 5 renames weights while loading (`vit.encoder.layer.0.attention.attention.query` on disk becomes
`vit.layers.0.attention.q_proj` in the model) and renames them back when saving. mmsurgery keeps every file in
the on-disk names — a paired or folded file of an HF folder has the keys `save_pretrained` writes — and converts
only where a file meets a live model, with transformers' own rules (`get_model_conversion_mapping`), so the
pathway keys `P.aux_weight` / `P.cross_modal_scale` follow their `P.weight` both ways.

Only renamings are supported: a key that one of transformers' `WeightConverter`s (merging or splitting tensors,
e.g. MoE experts) would claim is refused, since a pathway is defined per stored linear. transformers is imported
lazily; the name functions are the identity for a model that is not a `PreTrainedModel`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mmsurgery.checkpoint.pins import check_regular
from mmsurgery.errors import BadInputError
from mmsurgery.paired_format import is_pathway_key

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CONFIG_NAME",
    "NOT_CARRIED",
    "ModelFolder",
    "is_hf_model",
    "model_folder",
    "to_disk_names",
    "to_model_names",
]

T = TypeVar("T")
CONFIG_NAME = "config.json"  # what makes a folder a model folder (transformers' CONFIG_NAME)
NOT_CARRIED = (  # name patterns of a model folder's files that an output folder does not get
    *("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf"),
    "*.index.json",  # weights: the output's own are written, never the source's
    *("trainer_state.json", "rng_state*.pth", "optimizer.*", "scheduler.*", "scaler.pt", "training_args.bin"),
    *("latest", "zero_to_fp32.py"),  # a Trainer checkpoint's training state (DeepSpeed's too)
    "adapter_config.json",  # without its adapter weights it would make transformers load the folder as a PEFT adapter
)


@dataclass(frozen=True)
class ModelFolder:
    """A Hugging Face model folder given as an input: `path` as given (absolute when given as `.` or `..`), and
    `carried`, its top-level files that an output folder copies: `config.json`, generation config,
    preprocessor, processor and tokenizer files, ... (every regular, non-hidden file not in `NOT_CARRIED`)."""

    path: Path
    carried: tuple[str, ...]

    def sibling(self, suffix: str, *, replaces: str = "") -> Path:
        """The default output folder beside this one: `vit` -> `vit.paired`; with `replaces=".paired"`,
        `vit.paired` -> `vit.plain` for `suffix=".plain"`."""
        return self.path.with_name(self.path.name.removesuffix(replaces) + suffix)

    def extra_files(self) -> dict[str, Path]:
        """Output name -> source file, what `SafetensorsWriter(extra_files=...)` takes."""
        return {name: self.path / name for name in self.carried}


def model_folder(path: str | os.PathLike[str]) -> ModelFolder | None:
    """The model folder `path` names, or None when `path` is not a folder holding a `config.json` (a weights file
    named directly, even inside a model folder, is just that file). A `config.json`, or a file that would be
    carried, that is not a regular file (a FIFO, a socket, a device) is refused naming it, never skipped."""
    p = Path(path)
    try:
        if not p.is_dir() or not os.path.exists(p / CONFIG_NAME):
            return None
        check_regular(p / CONFIG_NAME)
        entries = sorted(os.scandir(p), key=lambda e: (e.name != CONFIG_NAME, e.name))
        listed = [
            e
            for e in entries
            if not e.name.startswith(".")
            and not e.is_dir()  # follows a symlink, as a Hub cache snapshot holds its files
            and not any(fnmatch.fnmatchcase(e.name, pattern) for pattern in NOT_CARRIED)
        ]
        for e in listed:
            if not e.is_file() and os.path.exists(e.path):  # a dangling link is passed over, as before
                check_regular(Path(e.path))
        carried = tuple(e.name for e in listed if e.is_file())
    except OSError as e:
        raise BadInputError(f"{p}: cannot read the folder ({e.strerror or type(e).__name__})") from None
    if p.name in ("", ".", ".."):
        p = Path(os.path.abspath(p))
    return ModelFolder(p, carried)


def output_for(
    out: str | os.PathLike[str] | None,
    source: str | os.PathLike[str],
    default: Path,
    suffix: str,
    *,
    replaces: str = "",
    occupied: Path | None = None,
) -> tuple[str | os.PathLike[str], dict[str, Path] | None]:
    """Where `pair`/`fold` write, and the files that go along: `out` as given (a str keeps a trailing `/`); else,
    for a model folder `source`, its sibling folder (`ModelFolder.sibling(suffix, replaces=...)`); else `default`,
    unless that lies inside `occupied` (the folder the input occupies, `Checkpoint.folder`: a sharded set's, or a
    folder given as the input), where no output may go: then that folder's sibling folder, named the same way.
    The second item is the source folder's carried files when the output is a folder, else None."""
    from mmsurgery.checkpoint.writer import is_folder_output

    folder = model_folder(source)
    if out is not None:
        dest: str | os.PathLike[str] = out
    elif folder is not None:
        dest = f"{folder.sibling(suffix, replaces=replaces)}{os.sep}"
    elif occupied is not None and _inside(default, occupied) and Path(os.path.abspath(occupied)).name:
        named = occupied if occupied.name not in ("", ".", "..") else Path(os.path.abspath(occupied))
        dest = f"{ModelFolder(named, ()).sibling(suffix, replaces=replaces)}{os.sep}"
    else:
        dest = default
    return dest, folder.extra_files() if folder is not None and is_folder_output(dest) else None


def _inside(path: Path, folder: Path) -> bool:
    real = Path(os.path.realpath(folder))
    return real in Path(os.path.realpath(path)).parents


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (without importing transformers if it is not loaded)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _transforms(model: nn.Module, *, legacy: bool) -> tuple[list[Any], list[Any]]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model, add_legacy=legacy)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def to_model_names(model: nn.Module, state: Mapping[str, T]) -> dict[str, T]:
    """`state`'s keys as `model.state_dict()` names them: transformers' load-time renaming for an HF model (keys
    already in the model's names stay as they are), unchanged for any other model. A pathway key (`P.aux_weight`,
    `P.cross_modal_scale`, `P.aux_weight_1`, ...) is named after its `P.weight`, so it follows the weight even where
    transformers adds or strips the base-model prefix (a `ViTModel` folder into `ViTForImageClassification`), which
    it decides from the model's own keys. Raises `BadInputError` when a key needs one of transformers' tensor
    converters, or when two keys would get the same name."""
    if not is_hf_model(model):
        return dict(state)
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _transforms(model, legacy=True)
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, T] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if key in own:
            name, converter = key, None
        elif is_pathway_key(key) and module:
            weight, converter = rename_source_key(f"{module}.weight", renamings, converters, prefix, own)
            name = f"{weight.removesuffix('.weight')}.{leaf}"
        else:
            name, converter = rename_source_key(key, renamings, converters, prefix, own)
        if converter is not None:
            raise BadInputError(
                f"{key}: transformers converts this tensor on load ({converter}); mmsurgery pairs stored "
                "linears one to one and cannot map a pathway through that conversion"
            )
        if name in out:
            raise BadInputError(f"{key}: two checkpoint keys become '{name}' in {type(model).__name__}")
        out[name] = value
    return out


def to_disk_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Model name → the name `save_pretrained` writes it under, for each of `names` (the inverse of
    `to_model_names`); the identity for a model that is not an HF model or has no renaming rules."""
    if not is_hf_model(model):
        return {n: n for n in names}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _transforms(model, legacy=False)
    reverse_renamings = [t.reverse_transform() for t in reversed(renamings)]
    reverse_converters = [t.reverse_transform() for t in reversed(converters)]
    out: dict[str, str] = {}
    for name in names:
        disk, converter = rename_source_key(name, reverse_renamings, reverse_converters, reverse=True)
        if converter is not None:
            raise BadInputError(f"{name}: transformers converts this tensor on save ({converter}); not supported")
        out[name] = disk
    return out
