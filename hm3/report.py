"""Front tables (pandas) and pairwise front plots (matplotlib), written atomically."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm3.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pandas only for the hint: importing it costs a preference request ~0.5 s
    import pandas as pd


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


#: Said under every front plot of 3+ objectives (static and interactive): a 2-D panel is a projection.
PROJECTION_NOTE = ("Each panel shows two of the objectives: a front point that looks dominated in a panel is better "
                   "on an objective that panel does not show.")


def _literal(text: str) -> str:
    """``text`` as matplotlib shows it literally: a pair of ``$`` would open math mode (``$x$ rate`` drawn
    as an italic x and "rate") and a legend drops labels that start with ``_``; objective and model names
    may hold either."""
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def plot_front(path: Path, *args: Any, **kwargs: Any) -> Path:
    """:func:`front_figure` (same arguments) written as a PNG at ``path``."""
    return save_figure(front_figure(*args, **kwargs), path)


def front_figure(
    objective_names: Sequence[str],
    candidates: np.ndarray,
    front: np.ndarray,
    references: Mapping[str, np.ndarray],
    *,
    title: str = "",
    paths: np.ndarray | None = None,
    front_ids: Sequence[int] | None = None,
    hv_trace: Sequence[float] = (),
):
    """One panel per pair of objectives: all candidates, the front, and reference models marked.

    ``paths`` (a boolean mask over ``front``) marks the front points that are level-2 layer paths;
    ``front_ids`` labels each front point with its id (front.csv's), so a dot can be matched to its
    recipe; ``hv_trace`` (level 1's hypervolume after each evaluation) adds a last panel. With 3+
    objectives a caption says that a 2-D panel is a projection (:data:`PROJECTION_NOTE`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(objective_names)
    pairs = list(itertools.combinations(range(k), 2)) or [(0, 0)]
    panels = len(pairs) + bool(len(hv_trace))
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.4 if k > 2 else 4), squeeze=False)
    # one marker and colour per reference model, the same in every panel (the legend is drawn once)
    shapes = itertools.cycle(["s", "^", "D", "v", "P", "X"])
    colours = itertools.cycle([f"C{i}" for i in range(10)])
    style = {name: (next(shapes), next(colours)) for name in references}
    for ax, (i, j) in zip(axes[0], pairs, strict=False):
        if len(candidates):
            ax.scatter(candidates[:, i], candidates[:, j], s=12, c="0.7", label="evaluated")
        if len(front):
            if k == 2:  # a 2-objective front is a staircase: join it
                order = np.argsort(front[:, i])
                ax.plot(front[order, i], front[order, j], "o-", c="tab:red", ms=5, lw=1, label="Pareto front")
            else:  # a projection of a higher-dimensional front is not a curve: points only
                ax.scatter(front[:, i], front[:, j], s=28, c="tab:red", label="Pareto front", zorder=4)
            if paths is not None and np.any(paths):
                ax.scatter(front[paths, i], front[paths, j], s=90, facecolors="none", edgecolors="tab:purple",
                           linewidths=1.5, label="front: level-2 path", zorder=6)
            for point, cid in zip(front, front_ids, strict=True) if front_ids is not None else ():
                ax.annotate(str(cid), (point[i], point[j]), xytext=(3, 3), textcoords="offset points", fontsize=7,
                            color="tab:red", zorder=7)
        for name, scores in references.items():
            marker, colour = style[name]
            ax.scatter([scores[i]], [scores[j]], marker=marker, c=colour, s=60, edgecolors="k", label=_literal(name),
                       zorder=5)
        ax.set_xlabel(_literal(objective_names[i]))
        ax.set_ylabel(_literal(objective_names[j]))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    if len(hv_trace):
        ax = axes[0][-1]
        ax.plot(np.arange(1, len(hv_trace) + 1), hv_trace, ".-", c="tab:blue")
        ax.set_xlabel("level-1 evaluations")
        ax.set_ylabel("hypervolume (validation)")
        ax.set_title("hypervolume after each evaluation", fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(_literal(title))
    fig.tight_layout()
    if k > 2:
        fig.text(0.5, 0.01, PROJECTION_NOTE, ha="center", va="bottom", fontsize=8, color="0.3")
        fig.subplots_adjust(bottom=0.2)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)
