"""Fine-tune a paired checkpoint with the Multimodal Pathway on scikit-learn's digits (CPU is enough).

Two kinds of input. A paired Hugging Face model folder (`mmsurgery pair vit_folder/ aux` writes `vit_folder.paired/`)
trains the `AutoModelForImageClassification` its `config.json` names and writes a model folder (on-disk names,
config with 10 labels, the input's processor files), which `mmsurgery fold` turns into a folder `from_pretrained`
loads. Any other paired checkpoint trains the built-in ViT:
a paired checkpoint (safetensors, sharded, or a `.pt` as training code saves it) holds the target ViT's timm keys plus `P.aux_weight` and
`P.cross_modal_scale` per pathway linear; its metadata may hold the ViT config as JSON under `mmsurgery.vit`.
A head of the wrong size (or none) is replaced by a fresh 10-class head. The trained paired checkpoint keeps
the input's metadata (with the config updated) and can be folded into a plain ViT afterwards.

    python examples/finetune.py paired.safetensors --out trained.safetensors --epochs 3
    python examples/finetune.py vit.paired/ --out vit.trained/ --epochs 3      # a Hugging Face model folder
    torchrun --standalone --nproc_per_node=2 examples/finetune.py paired.safetensors --out trained.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from mmsurgery.checkpoint import open_checkpoint, write_safetensors
from mmsurgery.data.digits import NUM_CLASSES, load_digits_tensors
from mmsurgery.hf import model_folder, to_disk_names, to_model_names
from mmsurgery.models.vit import METADATA_KEY, VisionTransformer, config_from_state_dict
from mmsurgery.paired_format import scale_values
from mmsurgery.pathway import attach, param_groups, scales, split_paired
from mmsurgery.training import accuracy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "paired", type=Path, help="paired checkpoint (.safetensors, ...) or paired Hugging Face model folder"
    )
    p.add_argument("--out", type=Path, required=True, help="the trained paired checkpoint (a folder for an HF input)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--scale-lr-mult", type=float, default=1.0, help="λ learning rate = lr × this")
    p.add_argument("--aux-frozen", action="store_true", help="train λ but keep W_aux fixed (the paper's 'fix')")
    p.add_argument("--num-heads", type=int, default=None, help="if neither given nor in the metadata: dim // 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    return p.parse_args(argv)


def build_model(
    state: dict[str, torch.Tensor], metadata: dict[str, str], num_heads: int | None, aux_frozen: bool
) -> VisionTransformer:
    """Build the ViT, attach the pathway, then load every tensor of the file strictly (λ included)."""
    plain, pathway = split_paired(state)
    config = config_from_state_dict(plain, num_heads=num_heads, metadata=metadata)
    fresh_head = config.num_classes != NUM_CLASSES
    if fresh_head:
        config = dataclasses.replace(config, num_classes=NUM_CLASSES)
    model = VisionTransformer(config)
    attach(model, pathway, aux_trainable=not aux_frozen)
    if fresh_head:
        state = {k: v for k, v in state.items() if k not in ("head.weight", "head.bias")}
        state |= {k: v.detach().clone() for k, v in model.head.state_dict(prefix="head.").items()}
    model.load_state_dict(state, strict=True)
    return model


class HFClassifier(nn.Module):
    """A Hugging Face image classifier as `images -> logits`, so the loop and `accuracy` treat it like the ViT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_hf_model(folder: Path, state: dict[str, torch.Tensor], aux_frozen: bool, log) -> HFClassifier:
    """The classifier of the folder's config with a fresh 10-class head, the pathway attached (the file's on-disk
    names converted to the model's), then every tensor of the file loaded strictly except the head."""
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(folder)
    if not hasattr(config, "image_size"):
        raise SystemExit(f"{folder}: config.json describes a {config.model_type!r} model, not an image model")
    config.num_labels = NUM_CLASSES
    model = AutoModelForImageClassification.from_config(config)
    attach(model, split_paired(state)[1], aux_trainable=not aux_frozen)
    named = to_model_names(model, state)
    own = model.state_dict()
    fresh = [k for k, v in own.items() if k not in named or named[k].shape != v.shape]
    unused = [k for k in named if k not in own]  # e.g. a base ViTModel's pooler, which a classifier does not have
    log(f"fresh: {', '.join(fresh) or 'none'}; not used: {', '.join(unused) or 'none'}")
    named = {k: v for k, v in named.items() if k in own} | {k: own[k].detach().clone() for k in fresh}
    model.load_state_dict(named, strict=True)
    return HFClassifier(model)


def save_hf(model: HFClassifier, source: Path, out: Path) -> None:
    """A model folder in one atomic publish: the weights under the names `save_pretrained` writes (pathway keys
    included), the updated `config.json`, and the input folder's other carried files (processor, ...)."""
    import tempfile

    state = model.model.state_dict()
    disk = to_disk_names(model.model, list(state))
    folder = model_folder(source)
    extras = dict(folder.extra_files()) if folder is not None else {}
    with tempfile.TemporaryDirectory() as tmp:
        model.config.to_json_file(Path(tmp) / "config.json")
        extras["config.json"] = Path(tmp) / "config.json"
        tensors = {disk[k]: v for k, v in state.items()}
        write_safetensors(f"{out}{os.sep}", tensors, metadata={"format": "pt"}, force=True, inputs=[source],
                          extra_files=extras)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    log = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(args.seed)  # the same fresh head on every rank
    with open_checkpoint(args.paired) as ck:  # safetensors, shards, a model folder, or a .pt as training saves it
        state, metadata = ck.to_state_dict(), dict(ck.metadata)
    hf = model_folder(args.paired) is not None
    if hf:
        model: nn.Module = build_hf_model(args.paired, state, args.aux_frozen, log)
        size, chans = model.config.image_size, model.config.num_channels
    else:
        model = build_model(state, metadata, args.num_heads, args.aux_frozen)
        size, chans = model.config.img_size, model.config.in_chans
    config = model.config
    splits = load_digits_tensors(size, chans, split_seed=args.split_seed)
    train = splits.train if args.train_limit is None else Subset(splits.train, range(args.train_limit))
    if distributed:
        sampler: DistributedSampler | RandomSampler = DistributedSampler(train, world, rank, seed=args.seed)
    else:
        sampler = RandomSampler(train, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    net: nn.Module = DistributedDataParallel(model) if distributed else model
    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay, lr=args.lr, scale_lr_mult=args.scale_lr_mult), lr=args.lr, fused=True
    )
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    desc = f"{type(model.model).__name__}, {config.num_hidden_layers} layers" if hf else str(config)
    log(f"{desc}\n{len(scales(model))} pathways, {n_trainable:,} trainable parameters, {world} process(es)")

    for epoch in range(1, args.epochs + 1):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        net.train()
        start = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            totals += torch.tensor([loss.item() * len(y), (logits.argmax(-1) == y).sum().item(), len(y)])
        if distributed:
            dist.all_reduce(totals)
        values = [abs(x) for v in scales(model).values() for x in scale_values(v)]  # every λ, of every auxiliary
        lam = sum(values) / len(values)
        log(
            f"epoch {epoch}/{args.epochs}  loss {totals[0] / totals[2]:.4f}  train_acc {totals[1] / totals[2]:.3f}"
            f"  val_acc {accuracy(model, splits.val):.3f}  mean|λ| {lam:.3g}  ({time.perf_counter() - start:.1f}s)"
        )
    log(f"test_acc {accuracy(model, splits.test):.3f}")

    if rank == 0 and hf:
        save_hf(model, args.paired, args.out)
        log(f"saved {args.out}{os.sep}")
    elif rank == 0:
        out_meta = {**metadata, METADATA_KEY: json.dumps(config.to_dict())}
        write_safetensors(args.out, model.state_dict(), metadata=out_meta, force=True, inputs=[args.paired])
        log(f"saved {args.out}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
