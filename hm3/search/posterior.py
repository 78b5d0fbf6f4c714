"""The level-1 BO posterior, kept with a run so preference requests can use it without fitting.

After level 1, :func:`fit_level1_posterior` fits one GP per objective (the optimisers' Matérn-5/2,
:func:`hm3.search.optimizers.bayes.fit_gp`) to every evaluated point and its normalised validation
scores. The run saves data + fitted state dicts, and the GPs' predictive mean and variance on a fixed
candidate grid (a scrambled Sobol set of the unit cube plus the evaluated points). A budget-0 request
(:func:`posterior_option`) then asks for the merge they predict best for its λ -- HM3's "answer a new
preference from what the search learned", in parameter space -- with a few tensor operations: the
GPs are independent, so the mean and variance of ``Σ_k λ_k f̂_k`` at each grid point follow from the
saved per-objective ones for any λ, and a fresh ``hm3 request`` process neither imports botorch nor
rebuilds a GP (together ~2 s on a 2-core CPU). Runs saved before the predictions were kept fall
back to rebuilding the GPs from their state dicts, which gives the same answer.

The file is a safetensors state file (:mod:`hm3.runfiles`): reading it runs no code. Runs saved
before that hold ``posterior.pt``, read with torch's restricted unpickler or refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.errors import RunFileError
from hm3.runfiles import find_state, read_state, save_state, state_path
from hm3.search.pareto import normalisation_span, normalise
from hm3.store import RunStore

POSTERIOR_STEM = "posterior"
POSTERIOR_FILE = state_path(Path(POSTERIOR_STEM)).name  # posterior.safetensors (posterior.pt in older runs)
GRID_SIZE = 1024  # Sobol points the proposal is chosen among (plus the evaluated points)


def fit_level1_posterior(
    store: RunStore, level1_scores: dict[int, np.ndarray], base: np.ndarray, ideal: np.ndarray
) -> dict[str, Any] | None:
    """GPs (one per objective, the optimisers' Matérn-5/2) on the level-1 points and their normalised
    validation scores, as data + fitted state dicts + predictions on the proposal grid: saved with
    the run so a request needs no GP at all. None with fewer than 4 points."""
    from hm3.search.level1 import told_points
    from hm3.search.optimizers.bayes import fit_gp

    told = [(c, x) for c, x in told_points(store) if c in level1_scores]
    if len(told) < 4:
        return None
    X = torch.tensor([x for _, x in told], dtype=torch.float64)
    F = torch.tensor(normalise(np.stack([level1_scores[c] for c, _ in told]), base, ideal), dtype=torch.float64)
    states = [fit_gp(X, F[:, k : k + 1]).state_dict() for k in range(F.shape[1])]
    return with_predictions({"X": X, "F": F, "gp_states": states})


def save_level1_posterior(
    store: RunStore, out_dir: Path, level1_scores: dict[int, np.ndarray], base: np.ndarray, ideal: np.ndarray
) -> Path | None:
    """Fit and save the posterior as ``out_dir/posterior.safetensors`` once (atomically), for a finished
    level 1 of either command (``hm3 search param`` or ``hm3 run``); the existing file if already saved
    (an older run's ``posterior.pt`` included)."""
    existing = find_state(Path(out_dir) / POSTERIOR_STEM)
    if existing is not None:
        return existing
    posterior = fit_level1_posterior(store, level1_scores, base, ideal)
    if posterior is None:
        return None
    return save_state(Path(out_dir) / POSTERIOR_FILE, _plain(posterior))


def _plain(posterior: dict[str, Any]) -> dict[str, Any]:
    """The posterior with its GP state dicts as plain dicts (what the state file keeps)."""
    return posterior | {"gp_states": [dict(s) for s in posterior["gp_states"]]}


def load_posterior(out_dir: Path) -> dict[str, Any] | None:
    """The saved posterior of a level 1 whose outputs are in ``out_dir``, or None if it has none.
    A corrupt file, or an older ``.pt`` that holds anything but tensors, is refused (RunFileError)."""
    path = find_state(Path(out_dir) / POSTERIOR_STEM)
    if path is None:
        return None
    saved = read_state(path, regenerate=f"delete {path} and resume the search that wrote it "
                                         "(hm3 search param/hm3 run CONFIG RUN_DIR --resume) to fit it again")
    missing = [k for k in ("X", "F", "gp_states") if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise RunFileError(f"{path}: not a level-1 posterior (missing {', '.join(missing)}); delete it and "
                           "resume the search that wrote it to fit it again")
    return saved


def with_predictions(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (data + GP state dicts) plus the GPs' predictions on the proposal grid."""
    grid = proposal_grid(saved["X"])
    mean, variance = _rebuilt_predictions(saved, grid)
    return saved | {"grid": grid, "mean": mean, "variance": variance}


def upgrade_posterior_file(out_dir: Path) -> bool:
    """Bring the posterior in ``out_dir`` saved by an older hm3 up to date (atomically, same GPs, so
    requests give the same answers, only sooner): grid predictions added, ``posterior.pt`` rewritten
    as ``posterior.safetensors`` (the old file is removed). True if anything changed."""
    saved = load_posterior(out_dir)
    legacy = Path(out_dir) / (POSTERIOR_STEM + ".pt")
    current = Path(out_dir) / POSTERIOR_FILE
    if saved is None or ("mean" in saved and current.is_file()):
        return False
    save_state(current, _plain(saved if "mean" in saved else with_predictions(saved)))
    legacy.unlink(missing_ok=True)
    return True


def proposal_grid(X: torch.Tensor) -> torch.Tensor:
    """The candidates a request's proposal is chosen among: a fixed scrambled Sobol set + ``X``."""
    sobol = torch.quasirandom.SobolEngine(X.shape[1], scramble=True, seed=0).draw(GRID_SIZE, dtype=torch.float64)
    return torch.cat([sobol, X])


def _rebuilt_predictions(saved: dict[str, Any], grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-objective predictive mean and variance (n × K) of the saved GPs at ``grid``."""
    from hm3.search.optimizers.bayes import make_gp

    X, F = saved["X"], saved["F"]
    means, variances = [], []
    for k, state in enumerate(saved["gp_states"]):
        gp = make_gp(X, F[:, k : k + 1])
        gp.load_state_dict(state)
        gp.eval()
        with torch.no_grad():
            post = gp.posterior(grid)
        means.append(post.mean[:, 0])
        variances.append(post.variance[:, 0])
    return torch.stack(means, 1), torch.stack(variances, 1)


def posterior_option(
    saved: dict[str, Any] | None, space: Any, lam: np.ndarray, base: np.ndarray, ideal: np.ndarray,
) -> tuple[float, dict[str, Any], np.ndarray] | None:
    """The level-1 BO posterior's proposal for λ: a merge the run never evaluated, predicted only.

    Over the proposal grid (:func:`proposal_grid`), the point with the best *lower* confidence bound
    of ``Σ_k λ_k f̂_k`` (mean − one standard deviation, independent GPs) wins; it is compared with
    measured options by that bound, so an extrapolating posterior does not beat a measured point by
    optimism alone. Returns (bound, recipe, predicted raw scores), or None where it does not apply
    (no saved posterior, or Fisher-weighted recipes, whose Fisher files a request cannot compute
    without evaluating).
    """
    if saved is None or space.fisher:
        return None
    if "mean" not in saved:  # saved by an hm3 that kept only the GPs' state
        saved = with_predictions(saved)
    grid, mu, var = saved["grid"], saved["mean"], saved["variance"]
    w = torch.tensor(lam, dtype=torch.float64)
    lcb = mu @ w - torch.sqrt((var * w**2).sum(1))
    best = int(torch.argmax(lcb))
    predicted = base + mu[best].numpy() * normalisation_span(base, ideal)
    return float(lcb[best]), space.to_recipe(grid[best]), predicted
