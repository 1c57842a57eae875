"""Training-step overhead of the pathway: plain ViT vs pathway (trainable W_aux) vs pathway (frozen W_aux).

A full AdamW step (zero_grad, forward, cross-entropy, backward, step) on a ViT-S (embed 384, depth 12,
6 heads, patch 16, 1000 classes). The three variants start from the same weights (the pathway ones with the
same random W_aux and λ = 0), run interleaved round robin in one process after a warm-up step each (the
starting variant rotates every round), and are compared by median step time. Peak memory (ru_maxrss) is
measured with --measure-memory in a separate process per variant, so each one's peak is its own.

    python benchmarks/train_overhead.py                      # batch 32, 224 px, 7 rounds
    python benchmarks/train_overhead.py --measure-memory --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmsurgery.models.vit import VisionTransformer, vit_small
from mmsurgery.pathway import attach, param_groups

VARIANTS = ("plain", "pathway-trainable-aux", "pathway-frozen-aux")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="timed steps per variant (interleaved)")
    p.add_argument("--steps", type=int, default=3, help="steps per memory subprocess, after 1 warm-up")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--measure-memory", action="store_true", help="peak RSS per variant, one process each")
    p.add_argument("--fused", action="store_true", help="torch's fused AdamW (one kernel for all parameters)")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(variant: str, img_size: int) -> nn.Module:
    """The same initial weights for every variant; the pathway ones get the same random ViT-S as aux."""
    config = vit_small(img_size=img_size)
    torch.manual_seed(0)
    model = VisionTransformer(config)
    if variant == "plain":
        return model
    torch.manual_seed(1)
    aux_model = VisionTransformer(config)
    paired = {f"{n}.aux_weight": aux_model.get_submodule(n).weight.detach() for n in model.block_linear_names()}
    paired |= {f"{n}.cross_modal_scale": torch.zeros(1) for n in model.block_linear_names()}
    return attach(model, paired, aux_trainable=variant == "pathway-trainable-aux")


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool = False) -> Callable[[], float]:
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.05, lr=1e-4), lr=1e-4, fused=fused or None)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - start

    return step


def data(batch: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, img_size, img_size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def peak_rss_mib() -> float:
    """This process's own peak RSS. VmHWM belongs to the address space, which exec replaces; ru_maxrss on
    Linux also carries the parent's RSS at fork time, so it is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(args: argparse.Namespace) -> None:
    model = build(args.memory_child, args.img_size)
    step = make_step(model, *data(args.batch, args.img_size), fused=args.fused)
    times = [step() for _ in range(1 + args.steps)]
    peak_mib = peak_rss_mib()
    print(
        json.dumps({"variant": args.memory_child, "peak_rss_mib": peak_mib, "median_s": statistics.median(times[1:])})
    )


def measure_memory(args: argparse.Namespace) -> dict[str, float]:
    peaks = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", variant, "--batch", str(args.batch),
               "--img-size", str(args.img_size), "--steps", str(args.steps)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.fused:
            cmd.append("--fused")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[variant] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    peaks = measure_memory(args) if args.measure_memory else {}  # first, while this process is still small
    x, y = data(args.batch, args.img_size)
    models = {v: build(v, args.img_size) for v in VARIANTS}
    steps = {v: make_step(m, x, y, fused=args.fused) for v, m in models.items()}
    for step in steps.values():  # warm-up: allocator, AdamW state, oneDNN primitives
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            times[v].append(steps[v]())

    base = statistics.median(times["plain"])
    print(
        f"# train_overhead: ViT-S, batch {args.batch}, {args.img_size} px, {'fused ' if args.fused else ''}AdamW, {args.rounds} interleaved rounds"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    print("| variant | trainable params | median step (s) | min step (s) | ratio to plain | median per-round ratio "
          "| peak RSS (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        n = sum(p.numel() for p in models[v].parameters() if p.requires_grad)
        med = statistics.median(times[v])
        per_round = statistics.median(t / p for t, p in zip(times[v], times["plain"], strict=True))
        peak = f"{peaks[v]:.0f}" if v in peaks else "-"
        print(
            f"| {v} | {n / 1e6:.2f} M | {med:.3f} | {min(times[v]):.3f} | {med / base:.3f} | {per_round:.3f} | {peak} |"
        )
    print()
    print("command: python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
