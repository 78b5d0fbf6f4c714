"""Readable reference merges: the oracle the fast kernels of ``hm3.merge.ops`` are tested against.

Each function reads top to bottom like its equation, in the style of mergekit's
``generalized_task_arithmetic`` (sparsify → ``get_mask`` → disjoint mean): one tensor per
step, no in-place tricks, no selection algorithms, no dtype games. Everything is computed in
float64, so a kernel's float32 result must be close to it, not bit-equal. Nothing here imports
``hm3.merge.ops``: a bug copied into both would otherwise pass unnoticed.

Notation: τ_k = θ_k − θ_base the task vector of model k, w_k its weight, ρ_k its density,
λ a global scale, F_k a diagonal Fisher, I_k = M (F_k + eps) / Σ_j (F_j + eps) its importance.
DARE's masks are arguments (as mergekit's ``torch.bernoulli`` draws would be); :func:`dare_mask`
is hm3's documented draw, so a test can reproduce the masks a seeded merge used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: mergekit: a weight sum this close to zero divides by 1 instead.
WEIGHT_SUM_EPS = 1e-8
#: mergekit: the L1 rescale of a DARE-dropped tensor is skipped when either norm is below this.
L1_RESCALE_EPS = 1e-7
FISHER_EPS = 1e-12


def _f64(tensors: Sequence[Tensor]) -> Tensor:
    """The models stacked along a new first axis ``[M, …]``, in float64."""
    return torch.stack([t.double() for t in tensors])


def _per_model(values: Sequence[float], like: Tensor) -> Tensor:
    """Per-model numbers shaped ``[M, 1, …, 1]`` to broadcast over a stacked ``[M, …]`` tensor."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64).reshape((-1,) + (1,) * (like.dim() - 1))


def importance(fishers: Sequence[Tensor], eps: float = FISHER_EPS) -> Tensor:
    """I_k = M (F_k + eps) / Σ_j (F_j + eps): DF-Merge's per-parameter reweighting, averaging 1 over models."""
    f = _f64(fishers) + eps
    return len(fishers) * f / f.sum(0)


def linear(thetas: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """θ = Σ_k w_k θ_k, divided by Σ_k w_k when normalising."""
    theta = _f64(thetas)
    w = _per_model(weights, theta)
    merged = (w * theta).sum(0)
    if normalize:
        merged = merged / w.sum()
    return merged


def task_arithmetic(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    normalize: bool = False,
    lam: float = 1.0,
    fishers: Sequence[Tensor] | None = None,
) -> Tensor:
    """θ = θ_base + λ Σ_k w_k I_k τ_k (/ Σ_k w_k I_k when normalising; a near-zero sum counts as 1)."""
    tau = _f64(deltas)
    w = _per_model(weights, tau)
    if fishers is not None:
        w = w * importance(fishers)
    mixed = (w * tau).sum(0)
    if normalize:
        divisor = w.sum(0) * torch.ones_like(mixed)
        divisor[divisor.abs() < WEIGHT_SUM_EPS] = 1
        mixed = mixed / divisor
    return base.double() + lam * mixed


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """TIES' trim: keep the k = max(1, int(ρ·n)) entries of largest |τ| (ties: the lowest index first)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    order = torch.argsort(delta.double().abs().reshape(-1), descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(delta.shape)


def get_mask(weighted: Tensor) -> Tensor:
    """mergekit's ``get_mask(method="sum")``: γ = sign(Σ_k w_k τ_k) (0 counts as +); model k agrees where
    sign(w_k τ_k) = γ, so an exactly-zero entry never agrees."""
    elected = torch.sign(weighted.sum(0))
    elected[elected == 0] = 1
    return torch.sign(weighted) == elected


def disjoint_mean(weighted: Tensor, weights: Tensor, agree: Tensor, normalize: bool) -> Tensor:
    """Σ_k [agree] w_k τ_k, divided by Σ_k [agree] w_k when normalising (a parameter nobody agrees on: by 1)."""
    mixed = (weighted * agree).sum(0)
    if normalize:
        divisor = (weights * agree).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return mixed


def ties(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool = True,
    lam: float = 1.0,
    fishers: Sequence[Tensor] | None = None,
    rescale: bool = False,
) -> Tensor:
    """TIES: trim each τ_k to its top-ρ_k magnitudes (times ‖τ_k‖₁ / ‖trimmed‖₁ with ``rescale``), elect a
    sign per parameter, average the agreeing ones."""
    trimmed = [d.double() * magnitude_mask(d, rho) for d, rho in zip(deltas, densities, strict=True)]
    if rescale:
        trimmed = [l1_rescaled(t, d) for t, d in zip(trimmed, deltas, strict=True)]
    trimmed = _f64(trimmed)
    w = _per_model(weights, trimmed) * torch.ones_like(trimmed)
    if fishers is not None:
        w = w * importance(fishers)
    weighted = w * trimmed
    agree = get_mask(weighted)
    return base.double() + lam * disjoint_mean(weighted, w, agree, normalize)


def dare_mask(shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator) -> Tensor:
    """hm3's DARE draw: m = [U < ρ] with U ~ U(0, 1) in float32, one per entry, from ``generator``."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) < density


def l1_rescaled(kept: Tensor, original: Tensor) -> Tensor:
    """kept · ‖τ‖₁ / ‖kept‖₁ (unchanged when either norm is below 1e-7): mergekit's ``rescale: true``."""
    before, after = original.double().abs().sum(), kept.abs().sum()
    return kept * (before / after) if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS else kept


def random_drop(delta: Tensor, density: float, keep: Tensor, rescale: str, probability: float | Tensor) -> Tensor:
    """τ̂ = m ⊙ τ, then divided by the keep probability (``inverse``), rescaled to τ's L1 norm (``l1``) or left
    (``none``). ρ ≥ 1 keeps τ and ρ ≤ 0 drops everything, whatever the mask."""
    tau = delta.double()
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    dropped = tau * keep
    if rescale == "inverse":
        return dropped / probability
    return l1_rescaled(dropped, delta) if rescale == "l1" else dropped


def dare(delta: Tensor, density: float, keep: Tensor, rescale: str = "l1") -> Tensor:
    """DARE: every entry is kept with probability ρ (:func:`random_drop`)."""
    return random_drop(delta, density, keep, rescale, density)


def dare_ties(
    base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
    masks: Sequence[Tensor], rescale: str = "l1", **options: Any,
) -> Tensor:
    """DARE-TIES: DARE each τ_k with its mask, then TIES' sign election and disjoint mean (no further trim).

    ``options``: :func:`ties`' ``normalize`` (default off here, as in mergekit), ``lam`` and ``fishers``.
    """
    dropped = [dare(d, rho, m, rescale) for d, rho, m in zip(deltas, densities, masks, strict=True)]
    return ties(base, dropped, weights, [1.0] * len(dropped), **({"normalize": False} | options))


def dare_linear(
    base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
    masks: Sequence[Tensor], rescale: str = "l1", **options: Any,
) -> Tensor:
    """DARE + task arithmetic: θ_base + λ Σ_k w_k I_k DARE(τ_k); ``options`` as :func:`task_arithmetic`'s."""
    dropped = [dare(d, rho, m, rescale) for d, rho, m in zip(deltas, densities, masks, strict=True)]
    return task_arithmetic(base, dropped, weights, **options)


def fisher_merge(
    thetas: Sequence[Tensor], fishers: Sequence[Tensor], weights: Sequence[float], eps: float = FISHER_EPS
) -> Tensor:
    """Fisher merging: θ = Σ_k w_k (F_k + eps) θ_k / Σ_k w_k (F_k + eps)."""
    theta = _f64(thetas)
    wf = _per_model(weights, theta) * (_f64(fishers) + eps)
    return (wf * theta).sum(0) / wf.sum(0)


def df_merge(
    base: Tensor, deltas: Sequence[Tensor], fishers: Sequence[Tensor], coefficients: Sequence[float],
    eps: float = FISHER_EPS,
) -> Tensor:
    """DF-Merge: θ = θ_base + M Σ_i (F_i + eps) λ_i τ_i / Σ_i (F_i + eps)."""
    tau = _f64(deltas)
    f = _f64(fishers) + eps
    lam = _per_model(coefficients, tau)
    return base.double() + len(deltas) * (f * lam * tau).sum(0) / f.sum(0)


def slerp(t: float, theta0: Tensor, theta1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """SLERP of the two flattened tensors: cos Ω = ⟨θ_0/‖θ_0‖, θ_1/‖θ_1‖⟩ (a norm ≤ eps is not divided by),
    θ = [sin((1−t)Ω) θ_0 + sin(tΩ) θ_1] / sin Ω; (1−t)θ_0 + tθ_1 when |cos Ω| > dot_threshold."""
    v0, v1 = theta0.double(), theta1.double()
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    cos_omega = (u0 * u1).sum().clamp(-1, 1)
    if cos_omega.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    omega = torch.acos(cos_omega)
    return (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)


def model_stock(base: Tensor, thetas: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al.): per vector (the whole tensor, or each row along the last axis with
    ``filter_wise``), cos φ = mean over pairs j < k of clamp(⟨τ_j, τ_k⟩ / max(‖τ_j‖‖τ_k‖, 1e-6), −1, 1),
    t = N cos φ / (1 + (N−1) cos φ) (0 where the denominator is within 1e-6 of 0), θ = t θ̄ + (1 − t) θ_base."""
    shape, n = base.shape, len(thetas)
    last = shape[-1] if filter_wise and base.dim() > 0 else base.numel()
    w0 = base.double().reshape(-1, last)
    ws = [th.double().reshape(-1, last) for th in thetas]
    taus = [w - w0 for w in ws]
    cosines = []
    for j in range(n):
        for k in range(j + 1, n):
            norm_product = torch.clamp(taus[j].norm(dim=1) * taus[k].norm(dim=1), min=1e-6)
            cosines.append(torch.clamp((taus[j] * taus[k]).sum(dim=1) / norm_product, -1, 1))
    cos_phi = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos_phi
    t = torch.zeros_like(cos_phi)
    regular = denominator.abs() >= 1e-6
    t[regular] = n * cos_phi[regular] / denominator[regular]
    t = t.unsqueeze(1)
    return (t * torch.stack(ws).mean(dim=0) + (1 - t) * w0).reshape(shape)


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs as mergekit counts it: with |τ| sorted ascending (equal magnitudes: the higher index
    first, so that ties keep the lower index), keep positions [n_bot, n_bot + int(ρn)) where
    n_bot = max(0, n − int(ρn) − int(γn)); ρ ≥ 1 keeps everything."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    descending = torch.argsort(delta.double().abs().reshape(-1), descending=True, stable=True)
    ascending = descending.flip(0)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[ascending[n_bot:n_bot + target]] = True
    return keep.reshape(delta.shape)


def breadcrumbs(
    base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
    gammas: Sequence[float], rescale: bool = False, consensus: bool = False, **options: Any,
) -> Tensor:
    """Breadcrumbs (``consensus``: breadcrumbs_ties): mask each τ_k, optionally restore its L1 norm, then task
    arithmetic or TIES' sign election at density 1; ``options``: ``normalize`` (default off) and ``lam``."""
    sparse = []
    for d, rho, g in zip(deltas, densities, gammas, strict=True):
        kept = d.double() * breadcrumbs_mask(d, rho, g) if rho < 1 else d.double()
        sparse.append(l1_rescaled(kept, d) if rescale and rho < 1 else kept)
    options = {"normalize": False} | options
    if consensus:
        return ties(base, sparse, weights, [1.0] * len(sparse), **options)
    return task_arithmetic(base, sparse, weights, **options)


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MAGPRUNE: in each row (axis 1; a 1-D tensor is one row) of n entries, sort |τ| ascending (equal
    magnitudes by index); the entry at sorted position j is kept with probability ρ − ε + 2ε j / (n − 1).
    A row of one entry: ρ."""
    rows = delta.double().reshape(1, -1) if delta.dim() < 2 else delta.double()
    n = rows.shape[1]
    lines = rows.movedim(1, -1)  # every line along axis 1, as the last axis
    flat = lines.reshape(-1, n)
    p = torch.empty_like(flat)
    ramp = torch.tensor([density - epsilon + 2 * epsilon * j / (n - 1) if n > 1 else density for j in range(n)],
                        dtype=torch.float64)
    for i in range(flat.shape[0]):  # one line at a time
        p[i, torch.argsort(flat[i].abs(), stable=True)] = ramp
    return p.reshape(lines.shape).movedim(-1, 1).reshape(delta.shape)


def della_mask(delta: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """hm3's DELLA draw: m = [U < p] with U ~ U(0, 1) in float32, one per entry, from ``generator``."""
    p = della_probabilities(delta, density, epsilon).float()
    return torch.rand(tuple(delta.shape), generator=generator, dtype=torch.float32) < p


def della(delta: Tensor, density: float, epsilon: float, keep: Tensor, rescale: str = "l1") -> Tensor:
    """DELLA's drop: entry i is kept with probability p_i (:func:`della_probabilities`, :func:`random_drop`)."""
    return random_drop(delta, density, keep, rescale, della_probabilities(delta, density, epsilon))


def della_merge(
    base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
    epsilons: Sequence[float], masks: Sequence[Tensor], rescale: str = "l1", consensus: bool = True,
    **options: Any,
) -> Tensor:
    """``della`` (``consensus``: TIES' sign election at density 1, normalised by default) or ``della_linear``
    (task arithmetic); ``options``: ``normalize`` and ``lam``."""
    dropped = [della(d, rho, eps, m, rescale)
               for d, rho, eps, m in zip(deltas, densities, epsilons, masks, strict=True)]
    if consensus:
        return ties(base, dropped, weights, [1.0] * len(dropped), **options)
    return task_arithmetic(base, dropped, weights, **({"normalize": False} | options))


def nuslerp(
    base: Tensor | None, thetas: Sequence[Tensor], weights: Sequence[float], flatten: bool = True,
    row_wise: bool = False,
) -> Tensor:
    """NuSLERP with t = w_2 / (w_1 + w_2) (½ for a sum within 1e-6 of 0), applied to the two models or, with a
    base, to their task vectors (then added to the base). Each vector pair — the whole tensors (``flatten``),
    each line along the last axis, or along the first (``row_wise``) — is interpolated on the sphere:
    cos Ω = ⟨v_0/max(‖v_0‖, 1e-7), v_1/max(‖v_1‖, 1e-7)⟩, v = [sin((1−t)Ω) v_0 + sin(tΩ) v_1] / sin Ω, and
    (1−t) v_0 + t v_1 when 1 − cos² Ω ≤ 1e-16."""
    w1, w2 = weights
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    v0, v1 = (th.double() - (0 if base is None else base.double()) for th in thetas)
    shape = v0.shape
    if flatten or v0.dim() < 2:
        pairs = [(v0.reshape(-1), v1.reshape(-1))]
    else:
        axis = 0 if row_wise else v0.dim() - 1
        lines0, lines1 = v0.movedim(axis, -1), v1.movedim(axis, -1)
        moved_shape = lines0.shape
        pairs = list(zip(lines0.reshape(-1, moved_shape[-1]), lines1.reshape(-1, moved_shape[-1]), strict=True))
    out = []
    for a, b in pairs:
        cos_omega = torch.clamp((a / a.norm().clamp(min=1e-7)) @ (b / b.norm().clamp(min=1e-7)), -1, 1)
        if 1 - cos_omega**2 <= 1e-16:
            out.append((1 - t) * a + t * b)
        else:
            omega = torch.acos(cos_omega)
            out.append((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega))
    if flatten or v0.dim() < 2:
        merged = out[0].reshape(shape)
    else:
        merged = torch.stack(out).reshape(moved_shape).movedim(-1, axis)
    return merged if base is None else base.double() + merged


def sce(base: Tensor, deltas: Sequence[Tensor], select_topk: float = 1.0) -> Tensor:
    """SCE (Wan et al., FuseChat): *select* the entries of largest variance across models (the top
    int(select_topk · #entries with nonzero variance), ties by index), *calculate* w_k = mean(τ_k²) / Σ_j mean(τ_j²)
    (1/M if that sum < 1e-6), *erase* the entries whose sign differs from sign(Σ_k τ_k) (0 counting as +),
    θ = θ_base + Σ_k w_k [agree] τ_k / max(Σ_k w_k [agree], 1e-6)."""
    tau = _f64(deltas)
    n = len(deltas)
    if select_topk < 1:
        variance = tau.var(0, unbiased=False).reshape(-1)
        k = int(int((variance != 0).sum()) * select_topk) if select_topk > 0 else 0
        order = torch.argsort(variance, descending=True, stable=True)
        selected = torch.zeros_like(variance, dtype=torch.bool)
        selected[order[:k]] = True
        tau = tau * selected.reshape(tau.shape[1:])
    mean_squares = (tau**2).reshape(n, -1).mean(1)
    w = torch.full((n,), 1 / n, dtype=torch.float64) if mean_squares.sum() < 1e-6 else mean_squares / mean_squares.sum()
    w = w.reshape((-1,) + (1,) * (tau.dim() - 1))
    elected = torch.sign(tau.sum(0))
    elected[elected == 0] = 1
    weights = w * (torch.sign(tau) == elected)
    return base.double() + (weights * tau).sum(0) / torch.clamp(weights.sum(0), min=1e-6)


def karcher(thetas: Sequence[Tensor], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Karcher mean on the unit sphere (fixed-point iteration of the mean log-map), scaled by the mean norm:
    directions u_k = θ_k/‖θ_k‖ of the tensors with ‖θ_k‖ > tol, equal weights; start μ = normalised mean of the
    u_k (the first u_k if that mean is shorter than tol); step μ ← exp_μ(Σ_k log_μ(u_k)/K) with
    log_μ(u) = Ω/sin Ω · (u − cos Ω μ) (0 for Ω < tol), renormalised; stop after max_iter steps or when the step is
    shorter than tol; θ = (Σ_k ‖θ_k‖ / M) μ. One tensor: itself; no direction: 0."""
    if len(thetas) == 1:
        return thetas[0].double()
    vectors = [th.double().reshape(-1) for th in thetas]
    norms = [v.norm() for v in vectors]
    directions = [v / n for v, n in zip(vectors, norms, strict=True) if n > tol]
    if not directions:
        return torch.zeros_like(thetas[0], dtype=torch.float64)
    mu = torch.stack(directions).mean(0)
    mu = directions[0] if mu.norm() < tol else mu / mu.norm()
    for _ in range(max_iter):
        logs = []
        for u in directions:
            cos_omega = torch.clamp(mu @ u, -1, 1)
            omega = torch.acos(cos_omega)
            logs.append(omega / torch.sin(omega) * (u - cos_omega * mu) if omega >= tol else torch.zeros_like(u))
        step = torch.stack(logs).mean(0)
        length = step.norm()
        if length < tol:
            break
        mu = torch.cos(length) * mu + torch.sin(length) * step / length
        if mu.norm() > tol:
            mu = mu / mu.norm()
    return (sum(norms) / len(thetas) * mu).reshape(thetas[0].shape)


def multislerp(base: Tensor | None, thetas: Sequence[Tensor], weights: Sequence[float],
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Multi-SLERP, read off its geometry: v_k the models (or their task vectors over ``base``), w the weights
    (÷ Σ w when normalising). The weighted mean of the unit directions, M = Σ w_k v_k/‖v_k‖, points where the
    result points; tangent steps around M/‖M‖ sum to zero (Σ w_k (u_k − ⟨u_k, m⟩ m) = M − ‖M‖ m), so the
    exponential map returns m itself. The length is the weighted mean norm Σ w_k ‖v_k‖. One model: itself.
    (mergekit divides by ‖v_k‖ + ε: kept here, so that float64 results agree beyond ε's relative size.)"""
    if len(thetas) == 1:
        return thetas[0].double()
    v = _f64(thetas) - (base.double() if base is not None else 0)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    flat = v.reshape(len(thetas), -1)
    norms = flat.norm(dim=1)
    mean = (w[:, None] * flat / (norms[:, None] + eps)).sum(0)
    merged = (mean / mean.norm() * (w * norms).sum()).reshape(thetas[0].shape)
    return merged + (base.double() if base is not None else 0)


def nearswap(t: float, base: Tensor, other: Tensor) -> Tensor:
    """NearSwap, entry by entry: the other model's value where it is within t of the base's; further out, a
    mix whose share of the other model is t / |Δ| (|Δ| taken ≥ 1e-6), so the base wins where they differ most."""
    a, b = base.double(), other.double()
    share = torch.minimum(t / (a - b).abs().clamp(min=1e-6), torch.ones_like(a)).clamp(min=0)
    return a + share * (b - a)


def ram(base: Tensor, deltas: Sequence[Tensor], epsilon: float = 1e-5, r: float | None = None,
        alpha: float = 0.2) -> Tensor:
    """RAM, entry by entry: a task-vector entry counts when |τ_k| > ε; an entry one model changed takes its
    change (times λ_k = 1 + r·min(ρ_k, α) for RAM+, when ``r`` is given: ρ_k = model k's counted entries
    shared with another model / its counted entries no other has, ε when it has none), one that several
    changed the mean of their changes."""
    tau = _f64(deltas)
    counted = tau.abs() > epsilon
    c = counted.sum(0)
    merged = torch.zeros_like(base, dtype=torch.float64)
    for k in range(len(deltas)):
        factor = 1.0
        if r is not None:
            shared = int((counted[k] & (c > 1)).sum())
            unique = int((counted[k] & (c == 1)).sum())
            factor = 1 + r * min(max(shared / (unique if unique else epsilon), 0.0), alpha)
        merged += torch.where(counted[k] & (c == 1), factor * tau[k], 0.0)
        merged += torch.where(counted[k] & (c > 1), tau[k] / c.clamp(min=1), 0.0)
    return base.double() + merged


def arcee_fusion(base: Tensor, other: Tensor) -> Tensor:
    """Arcee Fusion: importance |Δ| · KL(p ‖ q) per row, p and q the softmaxes (+1e-8) of the other model's and
    the base's rows; the change is taken where the importance reaches median + 1.5·(Q3 − Q1), each quantile
    read off the sorted importances at index ⌊q·(n−1)⌋."""
    a, b = base.double(), other.double()
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    importance = (b - a).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    return torch.where(importance >= median + 1.5 * (q3 - q1), b, a)
