"""The level-1 BO posterior, kept with a run so preference requests can use it without fitting.

After level 1, :func:`fit_level1_posterior` fits one GP per objective (the optimisers' Matérn-5/2,
:func:`hm3.search.optimizers.bayes.fit_gp`) to every evaluated point and its normalised validation
scores and the run saves data + fitted state dicts. A budget-0 request rebuilds the GPs from them
(:func:`posterior_option`, no fitting, well under a second) and asks for the merge they predict best
for its λ -- HM3's "answer a new preference from what the search learned", in parameter space.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hm3.search.pareto import normalisation_span, normalise
from hm3.store import RunStore

POSTERIOR_FILE = "posterior.pt"


def fit_level1_posterior(
    store: RunStore, level1_scores: dict[int, np.ndarray], base: np.ndarray, ideal: np.ndarray
) -> dict[str, Any] | None:
    """GPs (one per objective, the optimisers' Matérn-5/2) on the level-1 points and their normalised
    validation scores, as data + fitted state dicts: saved with the run so a request rebuilds the
    posterior without fitting. None with fewer than 4 points."""
    from hm3.search.level1 import told_points
    from hm3.search.optimizers.bayes import fit_gp

    told = [(c, x) for c, x in told_points(store) if c in level1_scores]
    if len(told) < 4:
        return None
    X = torch.tensor([x for _, x in told], dtype=torch.float64)
    F = torch.tensor(normalise(np.stack([level1_scores[c] for c, _ in told]), base, ideal), dtype=torch.float64)
    states = [fit_gp(X, F[:, k : k + 1]).state_dict() for k in range(F.shape[1])]
    return {"X": X, "F": F, "gp_states": states}


def posterior_option(
    saved: dict[str, Any] | None, space: Any, lam: np.ndarray, base: np.ndarray, ideal: np.ndarray,
    *, samples: int = 1024,
) -> tuple[float, dict[str, Any], np.ndarray] | None:
    """The level-1 BO posterior's proposal for λ: a merge the run never evaluated, predicted only.

    Over a scrambled Sobol set of the unit cube (plus the evaluated points), the point with the best
    *lower* confidence bound of ``Σ_k λ_k f̂_k`` (mean − one standard deviation, independent GPs)
    wins; it is compared with measured options by that bound, so an extrapolating posterior does not
    beat a measured point by optimism alone. Returns (bound, recipe, predicted raw scores), or None
    where it does not apply (no saved posterior, or Fisher-weighted recipes, whose Fisher files a
    request cannot compute without evaluating).
    """
    from hm3.search.optimizers.bayes import make_gp

    if saved is None or space.fisher:
        return None
    X, F = saved["X"], saved["F"]
    grid = torch.quasirandom.SobolEngine(X.shape[1], scramble=True, seed=0).draw(samples, dtype=torch.float64)
    grid = torch.cat([grid, X])
    means, variances = [], []
    for k, state in enumerate(saved["gp_states"]):
        gp = make_gp(X, F[:, k : k + 1])
        gp.load_state_dict(state)
        gp.eval()
        with torch.no_grad():
            post = gp.posterior(grid)
        means.append(post.mean[:, 0])
        variances.append(post.variance[:, 0])
    mu, var = torch.stack(means, 1), torch.stack(variances, 1)
    w = torch.tensor(lam, dtype=torch.float64)
    lcb = mu @ w - torch.sqrt((var * w**2).sum(1))
    best = int(torch.argmax(lcb))
    predicted = base + mu[best].numpy() * normalisation_span(base, ideal)
    return float(lcb[best]), space.to_recipe(grid[best]), predicted
