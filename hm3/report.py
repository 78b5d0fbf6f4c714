"""Front tables (pandas) and pairwise front plots (matplotlib), written atomically."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hm3.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pandas only for the hint: importing it costs a preference request ~0.5 s
    import pandas as pd


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


def plot_front(
    path: Path,
    objective_names: Sequence[str],
    candidates: np.ndarray,
    front: np.ndarray,
    references: Mapping[str, np.ndarray],
    *,
    title: str = "",
    paths: np.ndarray | None = None,
) -> Path:
    """One panel per pair of objectives: all candidates, the front, and reference models marked.

    ``paths`` (a boolean mask over ``front``) marks the front points that are level-2 layer paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(objective_names)
    pairs = list(itertools.combinations(range(k), 2)) or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    # one marker and colour per reference model, the same in every panel (the legend is drawn once)
    shapes = itertools.cycle(["s", "^", "D", "v", "P", "X"])
    colours = itertools.cycle([f"C{i}" for i in range(10)])
    style = {name: (next(shapes), next(colours)) for name in references}
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
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
        for name, scores in references.items():
            marker, colour = style[name]
            ax.scatter([scores[i]], [scores[j]], marker=marker, c=colour, s=60, edgecolors="k", label=name, zorder=5)
        ax.set_xlabel(objective_names[i])
        ax.set_ylabel(objective_names[j])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)
