"""Training-step overhead of the pathway: plain ViT vs pathway (trainable W_aux) vs pathway (frozen W_aux),
for each AdamW implementation torch has on CPU (the per-tensor loop, `foreach`, `fused`).

A full AdamW step (zero_grad, forward, cross-entropy, backward, step) on a ViT-S (embed 384, depth 12,
6 heads, patch 16, 1000 classes). All variants start from the same weights (the pathway ones with the same random
W_aux and λ = 0) and run interleaved round robin in one process after a warm-up step each (the starting variant
rotates every round). The result is the **median per-round ratio**: each step's time over the plain step with the
same optimizer in the same round, median over the rounds (the ratio of medians is printed too). `--reference`
adds the pathway computed as the plain autograd expression `W + λ·W_aux` (what `effective_weight` was before its
`autograd.Function`), so before and after are measured side by side. A second table times the pathway's own
work alone (forward + backward of the 48 effective weights, nothing else), new against the reference.
Peak memory (VmHWM) is measured with --measure-memory in a separate process per variant.

    python benchmarks/train_overhead.py                                  # all three optimizers, 7 rounds
    python benchmarks/train_overhead.py --optimizers fused --reference   # before/after, the recommended optimizer
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
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsurgery.foldmath import effective_weight
from mmsurgery.models.vit import VisionTransformer, vit_small
from mmsurgery.pathway import Pathway, attach, param_groups, pathway_modules

OPTIMIZERS = ("default", "foreach", "fused")
KINDS = ("plain", "trainable", "frozen")
REFERENCE_KINDS = ("trainable-ref", "frozen-ref")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="timed steps per variant (interleaved)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated: default, foreach, fused")
    p.add_argument("--reference", action="store_true", help="also the pathway as the plain autograd expression")
    p.add_argument("--steps", type=int, default=3, help="steps per memory subprocess, after 1 warm-up")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--measure-memory", action="store_true", help="peak RSS per variant, one process each")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    if bad := [o for o in args.optimizers if o not in OPTIMIZERS]:
        p.error(f"unknown optimizer(s) {bad}; choose from {', '.join(OPTIMIZERS)}")
    return args


def _reference_forward(self: Pathway, weight: Tensor) -> Tensor:
    return weight + self.cross_modal_scale.to(weight.dtype) * self.aux_weight


def build(kind: str, img_size: int) -> nn.Module:
    """The same initial weights for every variant; the pathway ones get the same random ViT-S as aux."""
    config = vit_small(img_size=img_size)
    torch.manual_seed(0)
    model = VisionTransformer(config)
    if kind == "plain":
        return model
    torch.manual_seed(1)
    aux_model = VisionTransformer(config)
    paired = {f"{n}.aux_weight": aux_model.get_submodule(n).weight.detach() for n in model.block_linear_names()}
    paired |= {f"{n}.cross_modal_scale": torch.zeros(1) for n in model.block_linear_names()}
    attach(model, paired, aux_trainable=kind.startswith("trainable"))
    if kind.endswith("-ref"):
        for pw in pathway_modules(model).values():
            pw.forward = types.MethodType(_reference_forward, pw)  # type: ignore[method-assign]
    return model


def make_optimizer(model: nn.Module, optimizer: str) -> torch.optim.Optimizer:
    flags = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optimizer]
    return torch.optim.AdamW(param_groups(model, 0.05, lr=1e-4), lr=1e-4, **flags)


def make_step(model: nn.Module, x: Tensor, y: Tensor, optimizer: str) -> Callable[[], float]:
    model.train()
    opt = make_optimizer(model, optimizer)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - start

    return step


def data(batch: int, img_size: int) -> tuple[Tensor, Tensor]:
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
    optimizer, kind = args.memory_child.split("/")
    model = build(kind, args.img_size)
    step = make_step(model, *data(args.batch, args.img_size), optimizer)
    times = [step() for _ in range(1 + args.steps)]
    print(
        json.dumps(
            {"variant": args.memory_child, "peak_rss_mib": peak_rss_mib(), "median_s": statistics.median(times[1:])}
        )
    )


def measure_memory(args: argparse.Namespace, variants: list[str]) -> dict[str, float]:
    peaks = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--memory-child", variant, "--batch", str(args.batch),
               "--img-size", str(args.img_size), "--steps", str(args.steps)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[variant] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


def pathway_ops(models: dict[str, nn.Module], rounds: int = 15) -> dict[str, float]:
    """Median seconds of the pathway's own work in one step (forward + backward of every effective weight, with
    a random upstream gradient), new `effective_weight` against the reference expression, interleaved."""
    times: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(3)
    for kind in ("trainable", "frozen"):
        model = next((m for v, m in models.items() if v.endswith("/" + kind)), None) or build(kind, 32)
        pws = [(m.parametrizations.weight.original, pw) for m in model.modules() if (pw := _pathway(m)) is not None]
        grads = [torch.randn(w.shape, generator=gen) for w, _ in pws]
        fns = {"new": effective_weight, "reference": lambda w, s, a: w + s.to(w.dtype) * a}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for (w, pw), g in zip(pws, grads, strict=True):
                    fn(w, pw.cross_modal_scale, pw.aux_weight).backward(g)
                times.setdefault(f"{kind} {name}", []).append(time.perf_counter() - start)
        for p in model.parameters():
            p.grad = None
    return {k: statistics.median(v) for k, v in times.items()}


def optimizer_steps(img_size: int, rounds: int = 15) -> dict[str, float]:
    """Median seconds of `opt.step()` alone (gradients filled with noise) for each AdamW implementation, plain ViT-S
    against the pathway with trainable W_aux (twice the parameters), interleaved."""
    models = {kind: build(kind, img_size) for kind in ("plain", "trainable")}
    gen = torch.Generator().manual_seed(4)
    for model in models.values():
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opts = {f"{o}/{k}": make_optimizer(m, o) for o in OPTIMIZERS for k, m in models.items()}
    times: dict[str, list[float]] = {v: [] for v in opts}
    for r in range(1 + rounds):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            if r:  # the first round creates the AdamW state
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _pathway(m: nn.Module) -> Pathway | None:
    plist = getattr(getattr(m, "parametrizations", None), "weight", None)
    return plist[0] if plist is not None and isinstance(plist[0], Pathway) else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    kinds = KINDS + (REFERENCE_KINDS if args.reference else ())
    variants = [f"{o}/{k}" for o in args.optimizers for k in kinds]
    peaks = measure_memory(args, variants) if args.measure_memory else {}  # first, while this process is small
    x, y = data(args.batch, args.img_size)
    models = {v: build(v.split("/")[1], args.img_size) for v in variants}
    steps = {v: make_step(models[v], x, y, v.split("/")[0]) for v in variants}
    for step in steps.values():  # warm-up: allocator, AdamW state, oneDNN primitives
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            times[v].append(steps[v]())
    ops = pathway_ops(models)
    counts = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()}
    del models, steps  # free their memory before the optimizer-only timing
    opt_steps = optimizer_steps(args.img_size)

    print(
        f"# train_overhead: ViT-S, batch {args.batch}, {args.img_size} px, AdamW ({', '.join(args.optimizers)}), "
        f"{args.rounds} interleaved rounds"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    print("| optimizer | variant | trainable params | median step (s) | min step (s) | ratio of medians "
          "| median per-round ratio | peak RSS (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        opt, kind = v.split("/")
        base = times[f"{opt}/plain"]
        n = counts[v]
        med = statistics.median(times[v])
        per_round = statistics.median(t / p for t, p in zip(times[v], base, strict=True))
        peak = f"{peaks[v]:.0f}" if v in peaks else "-"
        print(
            f"| {opt} | {kind} | {n / 1e6:.2f} M | {med:.3f} | {min(times[v]):.3f} | "
            f"{med / statistics.median(base):.3f} | {per_round:.3f} | {peak} |"
        )
    plain = statistics.median(t for o in args.optimizers for t in times[f"{o}/plain"])
    print()
    print("Pathway ops alone (forward + backward of the 48 effective weights), median of 15 interleaved rounds:")
    print()
    print("| W_aux | effective_weight | ms per step | % of a plain step |")
    print("|---|---|---|---|")
    for key, sec in ops.items():
        kind, name = key.split()
        print(f"| {kind} | {name} | {sec * 1e3:.1f} | {100 * sec / plain:.2f} |")
    print()
    print("`opt.step()` alone (AdamW over the plain ViT-S vs the pathway with trainable W_aux), median of 15 rounds:")
    print()
    print("| AdamW | plain (ms) | trainable W_aux (ms) | extra (ms) | extra, % of a plain step |")
    print("|---|---|---|---|---|")
    for o in OPTIMIZERS:
        extra = opt_steps[f"{o}/trainable"] - opt_steps[f"{o}/plain"]
        print(
            f"| {o} | {opt_steps[f'{o}/plain'] * 1e3:.1f} | {opt_steps[f'{o}/trainable'] * 1e3:.1f} | "
            f"{extra * 1e3:.1f} | {100 * extra / plain:.2f} |"
        )
    print()
    print("command: python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
