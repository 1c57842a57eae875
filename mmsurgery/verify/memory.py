"""How much memory a gate needs, estimated from the checkpoints' headers before anything is built, and how much
the machine has: a gate too big for its runner fails in a second with one line, not after minutes with the OOM
killer.

The estimate follows the run context's memory rule (docs/verify.md#memory), with F the float32 bytes of PLAIN's
weights and U those of PAIRED (W and W_aux): fold needs U (the model with its pathway), onnx 2.25·F (PLAIN's model
beside the exporter's working set, then beside the ONNX Runtime session), cost 2·F (PLAIN's model while the session
is kept for latency), latency up to 2·F (two sessions when the reference graph is not PLAIN's own); weights and
keys stream, so they stay flat at any size. Each adds `BASE`, the interpreter with torch, onnx and onnxruntime
loaded plus activations (measured 0.3–0.5 GB on the built-in ViTs; docs/benchmarks.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmsurgery.checkpoint.dtypes import FLOATING, ITEMSIZE
from mmsurgery.checkpoint.loaded import TensorInfo
from mmsurgery.errors import BadInputError
from mmsurgery.paired_format import is_pathway_key

__all__ = ["BASE", "Estimate", "available_bytes", "check_fits", "estimate", "parse_bytes"]

BASE = 600 * 2**20
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Bytes each chosen stage needs at its peak, and the weights they are computed from."""

    per_stage: dict[str, int]
    plain_float32: int
    paired_float32: int

    @property
    def peak(self) -> int:
        return max(self.per_stage.values(), default=BASE)

    @property
    def worst(self) -> str:
        return max(self.per_stage, key=lambda s: self.per_stage[s])


def _float32_bytes(infos: Iterable[TensorInfo]) -> int:
    """Bytes once the floating tensors are float32 (models run in float32 whatever the file holds)."""
    return sum(i.numel * (4 if i.dtype in FLOATING else ITEMSIZE.get(i.dtype, 8)) for i in infos)


def estimate(
    plain: Mapping[str, TensorInfo],
    paired: Mapping[str, TensorInfo] | None,
    stages: Sequence[str],
    *,
    onnx_given: bool = False,
    one_graph: bool = True,
) -> Estimate:
    """The peak bytes of each of `stages`. `onnx_given`: PLAIN's graph is a given file (no export); `one_graph`:
    the architecture exports the reference to PLAIN's own graph (the built-in ViT and Hugging Face models), so no
    second export or ORT session."""
    f = _float32_bytes(i for k, i in plain.items() if not is_pathway_key(k))
    u = _float32_bytes(paired.values()) if paired is not None else 0
    largest = max((i.numel * ITEMSIZE.get(i.dtype, 8) for i in plain.values()), default=0)
    exporter = 0 if onnx_given else f // 4
    need = {
        "weights": BASE + 6 * largest,  # a tensor of each file in flight, one ahead, and the fold's float32 work
        "keys": BASE,
        "fold": BASE + max(u, f),
        "onnx": BASE + 2 * f + exporter,
        "cost": BASE + 2 * f + (0 if one_graph else f // 4),
        "latency": BASE + (1 if one_graph else 2) * f,
    }
    return Estimate(per_stage={s: need[s] for s in stages}, plain_float32=f, paired_float32=u)


def available_bytes() -> int | None:
    """Memory this process may still use: the kernel's `MemAvailable`, capped by a cgroup v2 limit when one is
    set; None when neither can be read (the check is then skipped)."""
    have: list[int] = []
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if m:
            have.append(int(m.group(1)) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            have.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(have) if have else None


def parse_bytes(value: str | int) -> int:
    """`8G`, `3.5GB`, `512M`, `2GiB` or a number of bytes (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise BadInputError(f"--memory-limit {value}: must be > 0")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise BadInputError(f"--memory-limit {value!r}: give a size such as 8G, 3.5GB or 512M")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(need: Estimate, have: int) -> None:
    """Raise `BadInputError` naming the estimate, what is available and which stages would fit, unless every
    chosen stage fits in `have` bytes."""
    if need.peak <= have:
        return
    fit = [s for s, n in need.per_stage.items() if n <= have]
    if "latency" in fit and "onnx" not in fit:
        fit.remove("latency")  # it times the onnx stage's session
    worst = need.worst
    advice = (
        f"the stages that fit: --stages {','.join(fit)}" if fit else "no stage fits; free memory or use a larger runner"
    )
    raise BadInputError(
        f"this gate needs about {_gb(need.peak)} of memory (the {worst} stage; PLAIN is {_gb(need.plain_float32)} "
        f"in float32) and {_gb(have)} is available: {advice} (the weights stage proves every weight with "
        "flat memory at any size), or set --memory-limit if this machine has more"
    )
