"""Optional matplotlib figures (the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

from mmsurgery.describe import Description
from mmsurgery.errors import BadInputError
from mmsurgery.paired_format import module_of, scale_means

__all__ = ["plot_scales"]


def plot_scales(d: Description, path: Path) -> Path:
    """λ per pathway layer as a bar chart, coloured by linear role, saved to `path` (PNG)."""
    if not d.scales:
        raise BadInputError(f"{d.path}: --plot draws λ per layer, and this checkpoint has no pathway")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError("--plot needs matplotlib: pip install 'mmsurgery[plot]'") from None
    linears = [lin for s in d.stacks for b in s.blocks for lin in b.linears]  # block order, then role order
    roles = {module_of(lin.key): lin.role for lin in linears}
    order = list(roles)
    names = sorted(d.scales, key=lambda n: order.index(n) if n in order else len(order))
    kinds = [roles.get(n, "other") for n in names]
    palette = dict(zip(dict.fromkeys(kinds), plt.get_cmap("tab10").colors, strict=False))
    means = [scale_means(d.scales[n]) for n in names]  # one λ (or a finer λ's mean) per auxiliary
    num_aux = max(len(m) for m in means)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18 * num_aux), 3.5))
    width = 0.8 / num_aux
    for k in range(num_aux):  # auxiliaries side by side; the 2nd, 3rd... hatched
        xs = [i + (k - (num_aux - 1) / 2) * width for i in range(len(names))]
        values = [m[k] if k < len(m) else 0.0 for m in means]
        ax.bar(xs, values, width, color=[palette[kind] for kind in kinds], hatch=None if k == 0 else "//"[: k + 1])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_ylabel("λ (cross-modal scale)")
    what = f", {num_aux} auxiliaries (hatched: 2nd, 3rd...)" if num_aux > 1 else ""
    ax.set_title(f"λ per layer: {d.path.name}{what}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax.legend(handles, list(palette), fontsize=7, ncols=len(palette))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
