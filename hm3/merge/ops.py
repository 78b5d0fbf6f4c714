"""Merge operators as pure tensor functions: the fast kernels every merge method runs.

Notation: ``θ_base`` the base tensor, ``τ_k = θ_k − θ_base`` the task vector of model
k, ``w_k`` its weight, ``ρ_k`` its density, ``λ`` a global scale, ``F_k`` a diagonal
Fisher. The functions take tensors and plain numbers and return a new tensor; they
read no files, pick no device and parse no config, so the streaming engine and the
in-memory search path run the very same arithmetic. The methods of
:mod:`hm3.merge.methods` assemble them (DARE-TIES is :func:`dare` per model, then
:func:`ties` at density 1); readable equation-by-equation references live in the tests
(``tests/merge/reference.py``), which check these kernels against them and against mergekit.

Where mergekit 0.1.5 has the method, the numerics follow it (its defaults, its
guards against division by zero, its dtype handling and rounding order; see
``mergekit/merge_methods/generalized_task_arithmetic.py``, ``linear.py`` and
``sparsify.py``): linear, task arithmetic and TIES give mergekit's tensors bit for
bit in float32, bfloat16 and float16 (tests/merge/test_ops.py). Deliberate
differences, each documented where it occurs: TIES finds its magnitude threshold by
selection instead of a full sort (same kept set for distinct magnitudes; a fixed
tie rule otherwise); DARE draws its mask from an explicit ``torch.Generator`` so
that a seed reproduces a merge; a normalised linear merge whose weights sum to zero
is refused instead of returning inf/NaN.

Inputs are never modified; in-place operations touch only intermediates created
here. Inputs are assumed finite and of equal shapes: the caller validates them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from hm3.errors import ConfigError

RescaleMode = Literal["l1", "inverse", "none"]
RESCALE_MODES: tuple[str, ...] = ("l1", "inverse", "none")

#: mergekit skips the L1 rescale of a DARE-sparsified tensor when either norm is below this.
L1_RESCALE_EPS = 1e-7
#: mergekit's task-arithmetic divisor: a weight sum smaller than this in magnitude counts as 1.
WEIGHT_SUM_EPS = 1e-8
#: Low bits of the float32 pattern left to the second pass of the radix selection:
#: the first pass histograms the remaining 15 high bits (sign is always 0 for |τ|).
_RADIX_LOW_BITS = 16


# --- common pieces ---------------------------------------------------------------------------------------


def task_vector(theta: Tensor, base: Tensor) -> Tensor:
    """τ = θ − θ_base: what fine-tuning added to the base, the unit every merge method mixes."""
    return theta - base


def _require_same_length(**sequences: Sequence) -> int:
    """Number of models, after checking every per-model sequence has one entry per model."""
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{n}={v}" for n, v in lengths.items())
        raise ConfigError(f"merge inputs disagree on the number of models: {shown}")
    count = next(iter(lengths.values()))
    if count == 0:
        raise ConfigError("a merge needs at least one model; got none")
    return count


def _model_axis(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """Per-model numbers as an ``[M, 1, …, 1]`` tensor that broadcasts over stacked ``[M, *like.shape]``.

    The values are rounded to ``like``'s dtype, as mergekit rounds its weights to the
    tensor dtype before multiplying.
    """
    if isinstance(values, Tensor):
        t = values.to(dtype=like.dtype, device=like.device)
    else:
        t = torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)
    return t.reshape((-1,) + (1,) * like.dim())


def _finish(base: Tensor, mixed: Tensor, lam: float) -> Tensor:
    """θ_base + λ·mixed, in the base's dtype; ``mixed`` must be a fresh intermediate (scaled in place).

    As in mergekit, λ = 1 skips the multiplication, so the default is bit-exact.
    """
    if lam != 1:
        mixed.mul_(lam)
    if mixed.dtype == base.dtype:
        return mixed.add_(base)  # = base + mixed bit for bit (addition commutes), without a new full-size tensor
    return (base + mixed).to(base.dtype)


def _safe_weight_sum(total: Tensor) -> Tensor:
    """mergekit's task-arithmetic normaliser: a sum that is (almost) zero divides by 1 instead."""
    return total.masked_fill(total.abs() < WEIGHT_SUM_EPS, 1)


# --- linear and task arithmetic ---------------------------------------------------------------------------


def linear(thetas: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True) -> Tensor:
    """Model soup: θ = Σ_k w_k θ_k, divided by Σ_k w_k when ``normalize`` (mergekit's default).

    Like mergekit, the sum is accumulated in float32 (float64 for float64 inputs) so
    half-precision checkpoints do not lose bits, then cast back to the input dtype.
    A zero weight sum cannot be normalised and is refused rather than returning NaN.
    """
    _require_same_length(thetas=thetas, weights=weights)
    first = thetas[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor([float(v) for v in weights], dtype=acc_dtype, device=first.device)
    total = torch.zeros_like(first, dtype=acc_dtype)
    for theta, w_k in zip(thetas, w, strict=True):
        total.addcmul_(theta, w_k)
    if normalize:
        w_sum = w.sum()
        if float(w_sum) == 0.0:
            raise ConfigError(
                f"linear merge with normalize: the weights {list(weights)} sum to 0, so they cannot be "
                "normalised; change the weights or set normalize: false"
            )
        total.div_(w_sum)
    return total.to(first.dtype)


def _weighted_delta_sum(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    lam: float,
    importance: Tensor | None,
) -> Tensor:
    """θ_base + λ Σ_k w_k I_k τ_k (/ Σ_k w_k I_k), without stacking the deltas when I is absent.

    I (``importance``, stacked ``[M, …]``) is the per-parameter Fisher reweighting of
    :func:`fisher_importance`; without it this is mergekit's generalized task arithmetic
    with no consensus step.
    """
    w = _model_axis(weights, base).reshape(-1)
    # Half precision: each product is rounded, the sum accumulated in float32 and rounded once,
    # which is what mergekit's ``deltas.mul_(w).sum(0)`` does; float32 needs no conversion.
    acc_dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
    acc: Tensor | None = None
    for k, delta in enumerate(deltas):
        term = delta * w[k]
        if importance is not None:
            term.mul_(importance[k])
        acc = term.to(acc_dtype) if acc is None else acc.add_(term)
    assert acc is not None
    mixed = acc.to(base.dtype)
    if normalize:
        divisor = w.sum() if importance is None else (_model_axis(w, base) * importance).sum(0)
        mixed.div_(_safe_weight_sum(divisor))
    return _finish(base, mixed, lam)


def task_arithmetic(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lam: float = 1.0,
    importance: Tensor | None = None,
) -> Tensor:
    """Task arithmetic: θ = θ_base + λ Σ_k w_k τ_k (/ Σ_k w_k when ``normalize``, a near-zero sum counting as 1).

    With ``importance = fisher_importance(F)`` it is DF-Merge (see there for why).
    """
    _require_same_length(deltas=deltas, weights=weights)
    return _weighted_delta_sum(base, deltas, weights, normalize=normalize, lam=lam, importance=importance)


# --- TIES ---------------------------------------------------------------------------------------------------


def _kept_count(numel: int, density: float) -> int:
    """mergekit's k: ``max(1, int(density·numel))`` — a positive density keeps at least one entry."""
    return max(1, int(density * numel))


def _radix_kth_largest(keys: Tensor, k: int) -> tuple[Tensor, int]:
    """The k-th largest of non-negative int32 ``keys`` (flat) and how many keys are ≥ it.

    Two counting passes instead of a sort: a histogram of the high bits finds the
    bucket that holds the k-th largest key, then an O(m) selection runs over only
    the m keys in that bucket (a small fraction of n for real weight deltas).
    """
    high = keys >> _RADIX_LOW_BITS
    counts = torch.bincount(high, minlength=1 << (31 - _RADIX_LOW_BITS))
    # at_or_above[j] = number of keys in the j+1 highest buckets
    at_or_above = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(at_or_above, k))
    bucket = counts.numel() - 1 - j
    n_above = int(at_or_above[j]) - int(counts[bucket])
    in_bucket = keys[high == bucket]
    del high
    rank = k - n_above  # the k-th largest overall is the rank-th largest in the bucket
    threshold = torch.kthvalue(in_bucket, in_bucket.numel() - rank + 1).values
    return threshold, n_above + int((in_bucket >= threshold).sum())


def top_k_mask(delta: Tensor, k: int) -> Tensor:
    """Keep-mask (bool, shape of ``delta``) of the k largest |τ| entries (k ≤ 0: none, k ≥ numel: all).

    Only the magnitude of the k-th largest entry is needed, not an order of all
    entries, so instead of mergekit's full argsort (O(n log n), most of a TIES
    merge's time) the threshold is found by selection. float16/bfloat16/float32
    magnitudes are compared through their float32 bit patterns (for x ≥ 0 the
    IEEE-754 patterns, read as int32, order like the numbers) with a two-pass radix
    selection (:func:`_radix_kth_largest`); float64 uses ``torch.kthvalue``. Both
    are exact: for distinct magnitudes the mask equals mergekit's.

    Ties at the threshold: exactly k entries are kept, as in mergekit; among entries
    whose magnitude equals the threshold the lowest flat indices are kept. mergekit's
    unstable argsort keeps an unspecified subset of them instead, so on tied
    magnitudes the two may keep different (equal-magnitude) entries. The masks are
    nested: ``top_k_mask(τ, j)`` ⊆ ``top_k_mask(τ, k)`` for j ≤ k.
    """
    n = delta.numel()
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs().reshape(-1)
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()  # exact; mergekit also ranks half-precision magnitudes in float32
    if magnitude.dtype == torch.float32:
        keys = magnitude.view(torch.int32)
        threshold, n_kept = _radix_kth_largest(keys, k)
        keep = keys >= threshold
    else:
        keys = magnitude
        threshold = torch.kthvalue(keys, n - k + 1).values
        keep = keys >= threshold
        n_kept = int(keep.sum())
    excess = n_kept - k
    if excess > 0:  # drop the highest-index entries tied at the threshold
        tied = (keys == threshold).nonzero().reshape(-1)
        keep[tied[tied.numel() - excess :]] = False
    return keep.reshape(delta.shape)


def magnitude_threshold(delta: Tensor, density: float) -> Tensor:
    """TIES' keep-mask: the k = max(1, int(density·numel)) largest |τ| entries (:func:`top_k_mask`).

    Edge cases as mergekit: density ≥ 1 keeps everything, density ≤ 0 nothing.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return top_k_mask(delta, _kept_count(n, density))


def trim(delta: Tensor, density: float, *, out: Tensor | None = None) -> Tensor:
    """TIES step 1: zero all but the top-``density`` fraction of τ by magnitude (no rescaling).

    ``out`` (optional, like torch's) receives the result, so TIES can trim straight
    into its stacked buffer; without it density ≥ 1 returns ``delta`` itself.
    """
    if density >= 1:
        return delta if out is None else out.copy_(delta)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta) if out is None else out.zero_()
    keep = magnitude_threshold(delta, density)
    zero = delta.new_zeros(())
    return torch.where(keep, delta, zero) if out is None else torch.where(keep, delta, zero, out=out)


def elect_sign(weighted_deltas: Tensor) -> Tensor:
    """TIES step 3: γ = sign(Σ_k w_k τ_k) over stacked ``[M, …]`` deltas, a zero sum counting as +.

    Returned in the deltas' dtype with values in {−1, +1}: every parameter gets a
    direction, so the disjoint merge below is defined everywhere.
    """
    if weighted_deltas.shape[0] == 2:
        # one add instead of a reduction over the model axis (about twice as fast); it can differ from
        # ``sum(0)`` only in the sign of a zero, which ``ge_(0)`` does not see
        total = torch.add(weighted_deltas[0], weighted_deltas[1])
    else:
        total = weighted_deltas.sum(0)
    return total.ge_(0).mul_(2).sub_(1)


def _merge_aligned(aligned: Tensor, weights: Tensor, sign: Tensor, *, normalize: bool) -> Tensor:
    """Disjoint merge from ``aligned = γ ⊙ w τ`` (a fresh ``[M, …]`` buffer, consumed).

    Agreement is ``γ·w_k τ_k > 0`` (γ = ±1, so zeros never agree) and
    Σ_k [agree] w_k τ_k = γ ⊙ Σ_k max(γ·w_k τ_k, 0): clamping in place replaces a
    mask plus a masked copy of all M deltas; adding the non-agreeing zeros leaves the
    sums bit-identical to mergekit's ``(deltas * mask).sum(0)``.
    """
    aligned.clamp_(min=0)
    mixed = aligned.sum(0).mul_(sign)
    if normalize:
        divisor = aligned.sign_().mul_(weights).sum(0)  # Σ_k [agree_k] w_k
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return mixed


def sign_consensus_merge(
    base: Tensor,
    sparse_deltas: Tensor,
    weights: Sequence[float],
    *,
    normalize: bool,
    lam: float,
    importance: Tensor | None,
) -> Tensor:
    """TIES steps 2–4 (sign election, disjoint merge, λ) on freshly stacked sparse deltas ``[M, …]``,
    computed in that buffer (consumed): the entry point for methods that sparsify straight into a stack."""
    w = _model_axis(weights, base)
    if importance is not None:
        w = w * importance.to(base.dtype)
    weighted = sparse_deltas.mul_(w)
    sign = elect_sign(weighted)
    return _finish(base, _merge_aligned(weighted.mul_(sign), w, sign, normalize=normalize), lam)


def _trimmed_stack(base: Tensor, deltas: Sequence[Tensor], densities: Sequence[float]) -> Tensor:
    """``[M, …]`` buffer whose row k is ``trim(τ_k, ρ_k)``, written in place (no list + stack copy); in the task
    vectors' promoted dtype, which is the base's unless the models' is wider (float32 experts over a bfloat16 base)."""
    dtype = functools.reduce(torch.promote_types, (d.dtype for d in deltas), base.dtype)
    stacked = base.new_empty((len(deltas), *base.shape), dtype=dtype)
    for k, (delta, density) in enumerate(zip(deltas, densities, strict=True)):
        trim(delta, density, out=stacked[k])
    return stacked


def ties(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lam: float = 1.0,
    importance: Tensor | None = None,
    rescale_l1: bool = False,
) -> Tensor:
    """TIES-Merging: θ = θ_base + λ · Σ_k [sign(w_k τ̃_k) = γ] w_k τ̃_k, with τ̃_k = trim(τ_k, ρ_k)
    and γ = elect_sign(w ⊙ τ̃) (the disjoint merge).

    ``normalize`` (mergekit's default for ties) divides each parameter by the summed
    weights of the models that agree with γ. ``importance`` gives the Fisher-weighted
    variant (w_k → w_k·I_k; see :func:`fisher_importance`). ``rescale_l1`` (mergekit's
    ``rescale: true``) scales each trimmed τ̃_k back to ‖τ_k‖₁ before the sign election.
    """
    _require_same_length(deltas=deltas, weights=weights, densities=densities)
    stacked = _trimmed_stack(base, deltas, densities)
    if rescale_l1:
        for k, delta in enumerate(deltas):
            match_l1_(stacked[k], delta)
    return sign_consensus_merge(base, stacked, weights, normalize=normalize, lam=lam, importance=importance)


# --- DARE ---------------------------------------------------------------------------------------------------


def _check_rescale(rescale: str) -> None:
    if rescale not in RESCALE_MODES:
        raise ConfigError(f"unknown DARE rescale mode {rescale!r}; choose one of {', '.join(RESCALE_MODES)}")


def match_l1_(kept: Tensor, original: Tensor) -> Tensor:
    """Scale ``kept`` (a fresh sparsified tensor) in place so that ‖kept‖₁ = ‖original‖₁: mergekit's
    ``rescale: true``. Skipped when either norm is below 1e-7, as mergekit does."""
    before = torch.linalg.vector_norm(original, ord=1)
    after = torch.linalg.vector_norm(kept, ord=1)
    if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS:
        kept.mul_(before / after)
    return kept


#: A DARE/DELLA mask generator: torch's Mersenne Twister (``mask_rng: mt19937``) or numpy's SFC64 bit
#: generator (``mask_rng: sfc64``); :func:`hm3.merge.plan.mask_generator` seeds either. A
#: :class:`DrawnAhead` stands for either with its first draw already made.
RawGenerator = torch.Generator | np.random.BitGenerator


def _sfc64_words(generator: np.random.BitGenerator, n: int) -> np.ndarray:
    """The first ``n`` 32-bit words of the generator's stream: each raw 64-bit output gives its low word,
    then its high word (fixed little-endian order, so every platform reads the same words)."""
    raw = generator.random_raw((n + 1) // 2).astype("<u8", copy=False)
    return raw.view("<u4")[:n]


def _first_draw(generator: RawGenerator, n: int) -> Tensor | np.ndarray:
    """The values a mask of ``n`` entries draws first: float32 U(0, 1) from torch's generator (on its
    device), 32-bit words from SFC64."""
    if isinstance(generator, np.random.BitGenerator):
        return _sfc64_words(generator, n)
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32)


class DrawnAhead:
    """A mask generator whose first draw of ``numel`` values was made when this was built: on another
    thread, while the streaming engine merges the tensor before.

    Why: both generators draw serially, on one core, a large share of a DARE merge's arithmetic; each
    (tensor, model) mask has its own seeded generator, so its draw need not wait for the tensor's turn
    and can use a core the merge leaves idle. The values a method gets are exactly its generator's: the first draw of
    ``numel`` values is the one made ahead, and later draws continue the stream after it; a first draw
    of another size starts the stream afresh from ``make()`` (nothing is drawn twice or skipped).
    """

    def __init__(self, make: Callable[[], RawGenerator], numel: int):
        self._make = make
        self._generator = make()
        self._numel = numel
        self._ahead: Tensor | np.ndarray | None = _first_draw(self._generator, numel)
        self.draws_words = isinstance(self._generator, np.random.BitGenerator)

    def take(self, numel: int) -> tuple[Tensor | np.ndarray | None, RawGenerator]:
        """(The values drawn ahead, if this first draw is of their size, else None; the generator that
        makes any further draw)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and numel != self._numel:
            self._generator = self._make()  # a first draw of another size: the stream from its start
            ahead = None
        return ahead, self._generator


MaskGenerator = RawGenerator | DrawnAhead


def _take(generator: MaskGenerator, numel: int) -> tuple[Tensor | np.ndarray | None, RawGenerator]:
    if isinstance(generator, DrawnAhead):
        return generator.take(numel)
    return None, generator


def _sfc64_uniforms(words: np.ndarray, delta: Tensor, out: Tensor | None) -> Tensor:
    """``mask_rng: sfc64``'s U(0, 1) draws, float32: U = ⌊w / 2⁸⌋ · 2⁻²⁴ for the stream's 32-bit words w
    (torch.rand's float32 construction, on SFC64's words)."""
    high = torch.from_numpy(np.right_shift(words, 8).astype(np.int32)).reshape(delta.shape)
    draws = high.to(torch.float32).mul_(2.0**-24)
    if out is not None:
        return out.copy_(draws)
    return draws.to(delta.device)


def _draws_words(generator: MaskGenerator) -> bool:
    """Whether ``generator`` draws SFC64's 32-bit words (else torch's float32 uniforms)."""
    if isinstance(generator, DrawnAhead):
        return generator.draws_words
    return isinstance(generator, np.random.BitGenerator)


def _words(generator: MaskGenerator, n: int) -> np.ndarray:
    """The next ``n`` words of an SFC64 stream (drawn ahead or now)."""
    ahead, raw = _take(generator, n)
    return ahead if ahead is not None else _sfc64_words(raw, n)


def _sfc64_keep_mask(delta: Tensor, density: float, generator: MaskGenerator) -> Tensor:
    """[U < ρ] for :func:`_sfc64_uniforms`'s U, computed on the words directly (bool, on ``delta``'s device).

    U < r (r = ρ rounded to float32, as ``lt_`` compares) ⇔ ⌊w / 2⁸⌋ < ⌈r · 2²⁴⌉ ⇔ w < ⌈r · 2²⁴⌉ · 2⁸:
    one integer comparison per entry instead of building the floats, and the same mask.
    """
    words = _words(generator, delta.numel())
    threshold = math.ceil(float(np.float32(density)) * 2**24) << 8
    keep = np.ones(words.shape, dtype=bool) if threshold >= 1 << 32 else np.less(words, np.uint32(threshold))
    return torch.from_numpy(keep).reshape(delta.shape).to(delta.device)


def _uniforms(delta: Tensor, generator: MaskGenerator, *, out: Tensor | None = None) -> Tensor:
    """The U(0, 1) draws behind DARE's mask: one per entry, float32 whatever ``delta``'s dtype.

    Drawn on the generator's device and moved to ``delta``'s: torch refuses a CPU generator for a GPU
    draw, and drawing where the (CPU) generator lives gives a merge on a GPU the same masks as on a CPU.
    ``out`` (float32, ``delta``'s shape) is a buffer the draws may be written to; the result is returned
    either way (values drawn ahead are returned as they are, without a copy).
    """
    if _draws_words(generator):
        return _sfc64_uniforms(_words(generator, delta.numel()), delta, out)
    ahead, generator = _take(generator, delta.numel())
    if ahead is not None:
        return ahead.reshape(delta.shape).to(delta.device)
    if generator.device == delta.device:
        return torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32, out=out)
    draws = torch.rand(delta.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draws.to(delta.device) if out is None else out.copy_(draws)


def dare(
    delta: Tensor,
    density: float,
    *,
    generator: MaskGenerator,
    rescale: RescaleMode = "l1",
    out: Tensor | None = None,
) -> Tensor:
    """DARE: τ̂ = m ⊙ τ with m ~ Bernoulli(density), then rescaled.

    ``rescale``: ``"inverse"`` is the paper's τ̂ = m ⊙ τ / density (so E[τ̂] = τ);
    ``"l1"`` is mergekit's default, τ̂ scaled so that ‖τ̂‖₁ = ‖τ‖₁ (skipped when either
    norm is below 1e-7, as mergekit does); ``"none"`` keeps m ⊙ τ (mergekit with
    ``rescale: false``). density ≥ 1 returns τ unchanged, density ≤ 0 zeros.
    float16 is processed in float32 (as mergekit does on CPU) and cast back. ``out``
    (optional) receives the result, as in :func:`trim`.
    """
    _check_rescale(rescale)
    if density >= 1:
        return delta if out is None else out.copy_(delta)
    if density <= 0:
        return torch.zeros_like(delta) if out is None else out.zero_()
    work = delta.float() if delta.dtype == torch.float16 else delta
    if work.dtype == torch.float32:
        # draw into the result's buffer and turn the draws into m ⊙ τ in place: no other full-size tensor
        buffer = out if out is not None and out.dtype == torch.float32 else None
        kept = _uniforms(work, generator, out=buffer).lt_(density).mul_(work)
    else:
        kept = torch.where(_uniforms(work, generator) < density, work, work.new_zeros(()))
    if rescale == "inverse":
        kept.div_(density)
    elif rescale == "l1":
        match_l1_(kept, work)
    if out is None:
        return kept.to(delta.dtype)
    return kept if kept is out else out.copy_(kept)


def dare_(delta: Tensor, density: float, *, generator: MaskGenerator, rescale: RescaleMode = "l1",
          scratch: Tensor | None = None) -> Tensor:
    """:func:`dare` in place on ``delta`` (a fresh intermediate, e.g. a row of a stacked buffer): the same
    draws from ``generator`` and the same result, bit for bit.

    float32 turns the draws into a mask in ``scratch`` (a float32 tensor of ``delta``'s shape, reusable
    across models; allocated when None) and multiplies ``delta`` by it, so a DARE merge of M models needs
    one draw buffer instead of M results plus their stack. Other dtypes run :func:`dare` and copy back.
    """
    _check_rescale(rescale)
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if delta.dtype != torch.float32:
        return delta.copy_(dare(delta, density, generator=generator, rescale=rescale))
    if _draws_words(generator):
        mask = _sfc64_keep_mask(delta, density, generator)
    else:
        mask = _uniforms(delta, generator, out=scratch).lt_(density)
    before = torch.linalg.vector_norm(delta, ord=1) if rescale == "l1" else None
    delta.mul_(mask)  # τ·m: the same products as dare's m·τ
    if rescale == "inverse":
        delta.div_(density)
    elif before is not None:
        after = torch.linalg.vector_norm(delta, ord=1)
        if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def stacked_task_vectors(base: Tensor, thetas: Sequence[Tensor]) -> Tensor:
    """``[M, …]`` buffer whose row k is τ_k = θ_k − θ_base, written in place: one allocation for all M task
    vectors, which a sparsify-then-TIES method (DARE-TIES) then edits row by row and merges in place.
    Inputs of another dtype than the base are promoted as ``θ_k − θ_base`` would be."""
    dtype = base.dtype
    for theta in thetas:
        dtype = torch.promote_types(dtype, theta.dtype)
    stacked = base.new_empty((len(thetas), *base.shape), dtype=dtype)
    for k, theta in enumerate(thetas):
        torch.sub(theta, base, out=stacked[k])
    return stacked


# --- DELLA --------------------------------------------------------------------------------------------------


def della_problem(density: float, epsilon: float) -> str | None:
    """What is wrong with DELLA's (ρ, ε), or None: for 0 < ρ < 1 the probabilities ρ ± ε must lie in (0, 1)
    (mergekit's condition; ρ ≥ 1 keeps everything and ρ ≤ 0 nothing, whatever ε)."""
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return f"density ± epsilon must lie strictly between 0 and 1; got density {density:g}, epsilon {epsilon:g}"
    return None


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities p_i = ρ − ε + 2ε · r_i / (n − 1), shape of ``delta``.

    r_i ∈ {0, …, n−1} is the rank of |τ_i| within its row (axis 1, mergekit's choice; a
    1-D tensor is one row), smallest first, equal magnitudes in index order: the
    smallest entry is kept with probability ρ − ε, the largest with ρ + ε, and the
    mean over a row is ρ. A row of one entry gets p = ρ (mergekit fails on it).
    float32 (float64 for float64 inputs), whatever ``delta``'s dtype.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    dtype = _work_dtype(delta)
    if n < 2:
        return torch.full(delta.shape, float(density), dtype=dtype, device=delta.device)
    return _row_ranks(rows).to(dtype).mul_(2 * epsilon / (n - 1)).add_(density - epsilon).reshape(delta.shape)


def _row_ranks(rows: Tensor) -> Tensor:
    """Rank of each |x| along axis 1 of ``rows`` (≥ 2-D), smallest 0, equal magnitudes in index order.

    One stable sort and its inverse permutation by scatter (instead of arg-sorting the order again, which
    gives the same ranks at twice the cost). float32 and half-precision magnitudes are sorted as their
    float32 bit patterns read as int32, which order like the numbers for x ≥ 0 and sort faster; on the
    CPU, a 2-D tensor of them goes through :func:`_row_order_by_keys`.
    """
    magnitude = rows.abs()
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()
    if magnitude.dtype == torch.float32:
        magnitude = magnitude.view(torch.int32)
    if magnitude.dtype == torch.int32 and magnitude.dim() == 2 and magnitude.device.type == "cpu":
        order = _row_order_by_keys(magnitude)
    else:
        order = torch.argsort(magnitude, dim=1, stable=True)
    del magnitude
    axis = (1, rows.shape[1]) + (1,) * (rows.dim() - 2)
    positions = torch.arange(rows.shape[1], device=rows.device).reshape(axis).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _row_order_by_keys(bits: Tensor) -> Tensor:
    """``torch.argsort(bits, dim=1, stable=True)`` for non-negative int32 ``bits`` (a CPU matrix), by sorting
    the keys ``bits · 2³² + column`` with numpy and reading the columns back from their low 32 bits.

    Why: numpy sorts 64-bit integers with SIMD kernels (x86-simd-sort on AVX2 and AVX-512), about 4x faster
    on one core than torch's stable argsort on two, and the sort is DELLA's whole cost. The keys are
    distinct, so their order is the one order any sort gives, and it is the stable order of ``bits``
    (equal bits by column): the ranks are bit for bit the argsort's.
    """
    keys = bits.numpy().astype(np.int64)
    keys <<= 32
    keys |= np.arange(bits.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    return torch.from_numpy(keys).bitwise_and_(0xFFFFFFFF)


def della(
    delta: Tensor,
    density: float,
    epsilon: float,
    *,
    generator: MaskGenerator,
    rescale: RescaleMode = "l1",
) -> Tensor:
    """DELLA's MAGPRUNE: τ̂ = m ⊙ τ with m_i ~ Bernoulli(p_i), p = :func:`della_probabilities`, then rescaled.

    ``rescale``: ``"l1"`` (mergekit's ``rescale: true``) makes ‖τ̂‖₁ = ‖τ‖₁; ``"inverse"``
    is the paper's τ̂_i / p_i (so E[τ̂] = τ); ``"none"`` keeps m ⊙ τ. The draw is DARE's
    (m_i = [U_i < p_i], U_i ~ U(0, 1) in float32 from ``generator``), so with ε = 0 this
    is :func:`dare` on the same generator. density ≥ 1 returns τ, density ≤ 0 zeros;
    otherwise ρ ± ε must lie in (0, 1) (:func:`della_problem`). float16 is processed in float32.
    """
    _check_rescale(rescale)
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    problem = della_problem(density, epsilon)
    if problem:
        raise ConfigError(f"della: {problem}")
    work = delta.float() if delta.dtype == torch.float16 else delta
    p = della_probabilities(work, density, epsilon)
    kept = torch.where(_uniforms(work, generator) < p, work, work.new_zeros(()))
    if rescale == "inverse":
        kept.div_(p)
    elif rescale == "l1":
        match_l1_(kept, work)
    return kept.to(delta.dtype)


# --- Model Breadcrumbs ----------------------------------------------------------------------------------------


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' keep-mask: drop the γ fraction of largest |τ| (outliers), keep the next ρ fraction,
    drop the rest (the smallest).

    Counts as mergekit's: int(ρ·n) entries are kept and int(γ·n) dropped from the top,
    fewer when the two would overlap (the density wins); density ≥ 1 keeps everything,
    whatever γ. Ties are ordered as in :func:`top_k_mask`.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n_keep = max(0, int(density * n))
    n_top = min(int(gamma * n), n - n_keep)
    return top_k_mask(delta, n_top + n_keep) & ~top_k_mask(delta, n_top)


def breadcrumbs(delta: Tensor, density: float, gamma: float, *, rescale: RescaleMode = "none") -> Tensor:
    """τ̃ = m ⊙ τ with m = :func:`breadcrumbs_mask`; ``rescale="l1"`` (mergekit's ``rescale: true``)
    then restores τ's L1 norm (:func:`match_l1_`). density ≥ 1 returns τ itself."""
    if rescale not in ("l1", "none"):
        raise ConfigError(f"breadcrumbs rescales by the L1 norm or not at all ('l1' or 'none'), not {rescale!r}")
    if density >= 1:
        return delta
    kept = torch.where(breadcrumbs_mask(delta, density, gamma), delta, delta.new_zeros(()))
    return match_l1_(kept, delta) if rescale == "l1" else kept


# --- spherical interpolation --------------------------------------------------------------------------------

#: mergekit's SLERP falls back to linear interpolation when |cos Ω| exceeds this (nearly parallel tensors).
SLERP_DOT_THRESHOLD = 0.9995
#: mergekit's SLERP: a tensor whose norm is at most this is not normalised (its norm counts as 1).
SLERP_NORM_EPS = 1e-8


def _work_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision the spherical methods compute in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def slerp(t: float, theta0: Tensor, theta1: Tensor) -> Tensor:
    """SLERP: θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1, cos Ω = ⟨θ_0/‖θ_0‖, θ_1/‖θ_1‖⟩.

    The angle Ω is between the two whole tensors (flattened); t = 0 gives θ_0, t = 1 gives
    θ_1. As mergekit: when |cos Ω| > 0.9995 the tensors are (anti)parallel and the result
    is the linear (1−t)θ_0 + tθ_1; a norm ≤ 1e-8 counts as 1; computed in float32
    (float64 for float64) and returned in θ_0's dtype.
    """
    dtype = _work_dtype(theta0)
    a, b = theta0.to(dtype).reshape(-1), theta1.to(dtype).reshape(-1)
    norm_a, norm_b = (float(torch.linalg.vector_norm(v)) for v in (a, b))
    norm_a = norm_a if norm_a > SLERP_NORM_EPS else 1.0
    norm_b = norm_b if norm_b > SLERP_NORM_EPS else 1.0
    cos_omega = min(1.0, max(-1.0, float(torch.dot(a, b)) / (norm_a * norm_b))) if a.numel() else 1.0
    if abs(cos_omega) > SLERP_DOT_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        omega = math.acos(cos_omega)
        coef_a, coef_b = math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (a * coef_a).add_(b, alpha=coef_b).reshape(theta0.shape).to(theta0.dtype)


#: mergekit's NuSLERP: vectors are normalised by max(‖v‖, 1e-7).
NUSLERP_NORM_EPS = 1e-7
#: mergekit's NuSLERP: a pair with 1 − cos² Ω ≤ (1e-8)² is colinear and interpolated linearly.
NUSLERP_COLINEAR_EPS = 1e-8
#: mergekit's NuSLERP: weights summing to less than this in magnitude give t = ½.
NUSLERP_WEIGHT_SUM_EPS = 1e-6


def nuslerp_t(weights: Sequence[float]) -> float:
    """NuSLERP's t from the two models' weights: t = w_2 / (w_1 + w_2), ½ when the sum is (almost) 0."""
    w1, w2 = (float(w) for w in weights)
    return 0.5 if abs(w1 + w2) < NUSLERP_WEIGHT_SUM_EPS else w2 / (w1 + w2)


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, flatten: bool = True, row_wise: bool = False) -> Tensor:
    """NuSLERP: SLERP of each pair of vectors, v = [sin((1−t)Ω) v_0 + sin(tΩ) v_1] / sin Ω.

    The vectors are the whole tensors (``flatten``), else the lines along the last axis
    (rows of a matrix) or, with ``row_wise``, along the first axis (its columns); a 1-D
    tensor is one vector. cos Ω is taken between the vectors normalised by max(‖v‖, 1e-7);
    colinear pairs (1 − cos² Ω ≤ 1e-16) are interpolated linearly. Unlike :func:`slerp`
    there is no dot threshold. Computed in float32 (float64 for float64), returned in v_0's dtype.
    """
    dtype = _work_dtype(v0)
    a, b = v0.to(dtype), v1.to(dtype)
    if flatten or a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = a.movedim(0, -1), b.movedim(0, -1)
    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    norm_b = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos_omega = ((a / norm_a) * (b / norm_b)).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_omega.square()) <= NUSLERP_COLINEAR_EPS**2
    omega = torch.acos(torch.where(colinear, 0.0, cos_omega))
    sin_omega = torch.where(colinear, 1.0, torch.sin(omega))
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin_omega
    merged = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if not (flatten or v0.dim() < 2) and row_wise:
        merged = merged.movedim(-1, 0)
    return merged.reshape(v0.shape).to(v0.dtype)


# --- Multi-SLERP and NearSwap ---------------------------------------------------------------------------------


def multislerp(vectors: Sequence[Tensor], weights: Sequence[float], *, normalize_weights: bool, eps: float) -> Tensor:
    """Multi-SLERP: the weighted mean of the vectors' directions taken on the unit sphere, at their weighted norm.

    With u_k = v_k / (‖v_k‖ + ε) and weights w (divided by Σ w when ``normalize_weights``): the mean
    direction m = Σ w_k u_k / ‖Σ w_k u_k‖; each u_k is projected onto the plane tangent at m,
    t_k = u_k − ⟨u_k, m⟩ m, and the weighted tangent T = Σ w_k t_k mapped back by the exponential map,
    m cos‖T‖ + T sin‖T‖ / ‖T‖ (‖T‖ taken + ε), then scaled by Σ w_k ‖v_k‖. T vanishes up to rounding
    (Σ w_k t_k = M − ⟨M, m⟩ m = 0 for M = Σ w_k u_k), so this is m · Σ w_k ‖v_k‖; the steps are kept so
    that the roundings are mergekit's. The vectors are whole tensors (flattened). As mergekit: one vector is returned as it is; where ‖Σ w_k u_k‖ < ε two vectors are
    mixed linearly (w_1 v_1 + w_2 v_2) and more are refused (no direction to interpolate around),
    unless every vector is zero (task vectors of a tensor no model changed, such as biases left at
    their initial zeros): that gives zero, where mergekit refuses the whole merge.
    Computed in float32 (float64 for float64), returned in the first vector's dtype.
    """
    count = _require_same_length(vectors=vectors, weights=weights)
    first = vectors[0]
    if count == 1:
        return first
    dtype = _work_dtype(first)
    flat = torch.stack([v.to(dtype).reshape(-1) for v in vectors])
    w = torch.tensor([float(x) for x in weights], dtype=dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if not bool(norms.any()):  # [design] a tensor no model changed: mergekit refuses it with 3+ models
            return torch.zeros_like(first)
        if count != 2:
            raise ConfigError(
                f"multislerp: the weighted mean of the models' directions has norm {float(mean_norm):.3g}, below eps "
                f"{eps:g} (models pointing in opposite directions with weights that balance out, or an eps not small "
                "against the vectors' norms), so there is no direction to interpolate around; change the weights or eps"
            )
        return (w[0] * flat[0] + w[1] * flat[1]).reshape(first.shape).to(first.dtype)
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w[:, None]).sum(0)
    angle = torch.linalg.vector_norm(tangent) + eps
    on_sphere = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)
    return (on_sphere * (norms[:, 0] * w).sum()).reshape(first.shape).to(first.dtype)


#: mergekit's NearSwap: differences smaller than this count as this (t / |Δ| stays finite).
NEARSWAP_DIFF_EPS = 1e-6


def nearswap(t: float, base: Tensor, other: Tensor) -> Tensor:
    """NearSwap: θ = w·θ_1 + (1−w)·θ_base entry by entry, w = clamp(t / max(|θ_base − θ_1|, 1e-6), 0, 1).

    Entries where the two models differ by at most t take the other model's value; further apart, the
    other model's share falls as t / |Δ|, so the base keeps what the other model changed most. Computed
    in float32 (float64 for float64), returned in the base's dtype.
    """
    dtype = _work_dtype(base)
    a, b = base.to(dtype), other.to(dtype)
    share = (t / (a - b).abs().clamp(min=NEARSWAP_DIFF_EPS)).clamp(0, 1)
    return (share * b + (1 - share) * a).to(base.dtype)


# --- RAM (Reinforced Agent Merging) -----------------------------------------------------------------------------


def ram_kept(deltas: Sequence[Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """RAM's inputs: the task vectors stacked ``[K, …]`` with every entry of magnitude ≤ ε set to 0, which
    entries are kept, and per entry the count c of models whose entry is kept (0 where none is)."""
    stacked = torch.stack(list(deltas))
    kept = stacked.abs() > epsilon
    return stacked * kept, kept, kept.sum(0)


def ram(base: Tensor, deltas: Sequence[Tensor], *, epsilon: float) -> Tensor:
    """RAM: θ = θ_base + Σ_k τ̃_k / max(c, 1), τ̃_k = τ_k where |τ_k| > ε (else 0), c the models with |τ_k| > ε.

    An entry only one model changed takes that model's change whole; one that several changed, their
    mean; the near-zero entries of a task vector do not dilute the others' (as a plain average would).
    """
    _require_same_length(deltas=deltas)
    values, _, counts = ram_kept(deltas, epsilon)
    # computed in the inputs' dtype, as mergekit computes it; returned in the base's, as every method with a base
    return (base + (values / counts.clamp(min=1)).sum(0)).to(base.dtype)


def ram_plus(base: Tensor, deltas: Sequence[Tensor], *, r: float, alpha: float, epsilon: float) -> Tensor:
    """RAM+ (tensor-local): RAM with each model's unique entries (c = 1) scaled up by λ_k = 1 + r·min(ρ_k, α).

    ρ_k = (model k's kept entries that others also changed) / (its kept entries no other changed), counted
    over this tensor (a count of 0 divides by ε): a model that shares much of what it changed has its
    unique changes amplified, compensating for the averaging of the shared ones. Entries several models
    changed take their mean, as in :func:`ram`. The terms are summed as mergekit sums them, so that the
    roundings agree.
    """
    count = _require_same_length(deltas=deltas)
    values, kept, counts = ram_kept(deltas, epsilon)
    shared, unique = counts > 1, counts == 1
    flat = kept.reshape(count, -1)
    rho = (flat & shared.reshape(1, -1)).sum(1) / (flat & unique.reshape(1, -1)).sum(1).clamp(min=epsilon)
    lam = (1 + r * rho.clamp(min=0, max=alpha)).reshape((-1,) + (1,) * base.dim())
    return (base + (values * unique * lam + values * shared / counts.clamp(min=1)).sum(0)).to(base.dtype)


# --- Arcee Fusion ----------------------------------------------------------------------------------------------

#: mergekit's Arcee Fusion: added to both softmaxes before the KL divergence's logarithm.
FUSION_SOFTMAX_EPS = 1e-8


def fusion_importance(base: Tensor, other: Tensor) -> Tensor:
    """Arcee Fusion's importance: |θ_1 − θ_base| times the KL divergence of softmax(θ_1) from softmax(θ_base)
    over each row (the last axis), so a change counts more in a row whose output distribution it moves."""
    p = torch.softmax(other, dim=-1) + FUSION_SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + FUSION_SOFTMAX_EPS
    return (other - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)


def fusion_threshold(importance: Tensor) -> Tensor:
    """median + 1.5 · (Q3 − Q1) of the importance (the outlier fence of a box plot), each quantile q the
    entry at index ⌊q·(n−1)⌋ of the sorted values, as mergekit takes them.

    [design] mergekit takes the quantiles of a random sample of 1M entries when a tensor has more (an
    unseeded draw: its merges of such tensors differ run to run); here they are exact at every size, found
    by selection (``kthvalue``) rather than a sort, so equal to mergekit's wherever mergekit's are exact."""
    flat = importance.reshape(-1)
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()  # float32 product, as mergekit's
    q1, median, q3 = (flat.kthvalue(int(i) + 1).values for i in positions)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, other: Tensor) -> Tensor:
    """Arcee Fusion: θ = θ_base + (θ_1 − θ_base) ⊙ [I ≥ median(I) + 1.5·IQR(I)], I = :func:`fusion_importance`.

    Only the other model's most important changes (the importance's upper outliers) are taken; every other
    entry keeps the base's value. Computed in float32 (float64 for float64), returned in the base's dtype.
    """
    dtype = _work_dtype(base)
    a, b = base.to(dtype), other.to(dtype)
    importance = fusion_importance(a, b)
    return (a + (b - a) * (importance >= fusion_threshold(importance))).to(base.dtype)


# --- Model Stock ----------------------------------------------------------------------------------------------

#: mergekit's Model Stock: a product of norms below this divides by it instead (so a zero task vector gives cos 0).
MODEL_STOCK_NORM_EPS = 1e-6
#: mergekit's Model Stock: where |1 + (N−1) cos φ| is below this, t = 0 (the base is kept).
MODEL_STOCK_SINGULAR_EPS = 1e-6


def _as_vectors(x: Tensor, *, filter_wise: bool) -> Tensor:
    """``x`` as rows ``[R, n]``: one row per filter (last axis) when ``filter_wise``, else the whole tensor."""
    return x.reshape(-1, x.shape[-1]) if filter_wise and x.dim() > 0 else x.reshape(1, -1)


def model_stock(base: Tensor, thetas: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock: θ = t·θ̄ + (1−t)·θ_base with θ̄ = (1/N) Σ_k θ_k and t = N cos φ / (1 + (N−1) cos φ).

    cos φ is the mean, over the N(N−1)/2 pairs, of the cosine between task vectors
    τ_j, τ_k (each cosine clamped to [−1, 1]); it is taken over the whole tensor, or per
    row (filter) with ``filter_wise``, giving one t per row. As mergekit: a product of
    norms below 1e-6 divides by 1e-6, and where 1 + (N−1) cos φ is within 1e-6 of 0 the
    base is kept (t = 0). Computed in float32 (float64 for float64), returned in the base's dtype.
    """
    count = _require_same_length(thetas=thetas)
    if count < 2:
        raise ConfigError(f"model_stock needs at least 2 models besides the base; got {count}")
    dtype = _work_dtype(base)
    w0 = _as_vectors(base.to(dtype), filter_wise=filter_wise)
    taus = [_as_vectors(theta.to(dtype), filter_wise=filter_wise) - w0 for theta in thetas]
    norms = [torch.linalg.vector_norm(tau, dim=-1) for tau in taus]
    cos_sum = torch.zeros_like(norms[0])
    for j in range(count):
        for k in range(j + 1, count):
            dot = (taus[j] * taus[k]).sum(-1)
            cos_sum += (dot / (norms[j] * norms[k]).clamp(min=MODEL_STOCK_NORM_EPS)).clamp(-1, 1)
    cos_phi = (cos_sum / (count * (count - 1) // 2)).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos_phi
    singular = denominator.abs() < MODEL_STOCK_SINGULAR_EPS
    t = torch.where(singular, 0.0, count * cos_phi / torch.where(singular, 1.0, denominator))
    mean = sum(_as_vectors(theta.to(dtype), filter_wise=filter_wise) for theta in thetas) / count
    return (t * mean + (1 - t) * w0).reshape(base.shape).to(base.dtype)


# --- SCE ----------------------------------------------------------------------------------------------------

#: mergekit's SCE: per-model weights whose sum is below this are replaced by 1/M.
SCE_WEIGHT_SUM_EPS = 1e-6
#: mergekit's SCE: the summed weights of the agreeing models divide the merge, floored at this.
SCE_DIVISOR_EPS = 1e-6


def sce_mask(stacked_deltas: Tensor, select_topk: float) -> Tensor:
    """SCE's *select*: keep-mask of the entries whose variance across the M models is among the
    int(select_topk · #nonzero-variance entries) largest (bool, shape of one model's τ). select_topk ≥ 1
    keeps every entry, ≤ 0 none; ties are ordered as in :func:`top_k_mask`."""
    like = stacked_deltas[0]
    if select_topk >= 1:
        return torch.ones_like(like, dtype=torch.bool)
    if select_topk <= 0:
        return torch.zeros_like(like, dtype=torch.bool)
    variance = stacked_deltas.var(0, unbiased=False)
    return top_k_mask(variance, int(int(torch.count_nonzero(variance)) * select_topk))


def sce(base: Tensor, deltas: Sequence[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """SCE (select, calculate, erase): θ = θ_base + Σ_k w_k a_k τ̃_k / max(Σ_k w_k a_k, 1e-6).

    τ̃_k = m ⊙ τ_k with m = :func:`sce_mask` (*select*); w_k = mean(τ̃_k²) / Σ_j mean(τ̃_j²),
    or 1/M when that sum is below 1e-6 (*calculate*, mergekit's guard); a_k = [sign τ̃_k = γ]
    with γ = sign(Σ_k τ̃_k), 0 counting as + (*erase*: TIES' election on the unweighted task
    vectors, so a zero entry never agrees). Computed in the base's dtype, as mergekit.
    """
    count = _require_same_length(deltas=deltas)
    tau = torch.stack(list(deltas))  # fresh: safe to update in place
    if select_topk < 1:
        tau.mul_(sce_mask(tau, select_topk))
    weights = tau.square().reshape(count, -1).mean(1)
    total = float(weights.sum())
    weights = torch.full_like(weights, 1 / count) if abs(total) < SCE_WEIGHT_SUM_EPS else weights / total
    agreeing = _model_axis(weights, base) * (torch.sign(tau) == elect_sign(tau))
    mixed = (tau * agreeing).sum(0) / agreeing.sum(0).clamp(min=SCE_DIVISOR_EPS)
    return (base + mixed).to(base.dtype)


# --- Karcher mean ----------------------------------------------------------------------------------------------


def karcher(thetas: Sequence[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Karcher mean: θ = (1/M Σ_k ‖θ_k‖) · μ, μ the Riemannian mean on the unit sphere of the directions u_k = θ_k/‖θ_k‖.

    μ starts at the normalised mean of the u_k and moves along the mean log-map
    T = Σ_k α_k Ω_k / sin Ω_k · (u_k − cos Ω_k μ), cos Ω_k = ⟨μ, u_k⟩, to
    μ ← cos‖T‖ μ + sin‖T‖ T/‖T‖ (renormalised), for at most ``max_iter`` steps or until
    ‖T‖ < tol. As mergekit: only tensors with ‖θ_k‖ > tol have a direction (α_k = 1 over their
    count), a u_k within angle tol of μ adds nothing, a start of norm < tol is the first
    direction, no direction at all gives 0, and one tensor is returned as it is. Computed in
    float32 (float64 for float64), returned in the first tensor's dtype. Antipodal directions
    have no unique mean: there the factor Ω/sin Ω (Ω ≈ π) amplifies float32 rounding, as in mergekit.
    """
    count = _require_same_length(thetas=thetas)
    if count == 1:
        return thetas[0]
    first = thetas[0]
    dtype = _work_dtype(first)
    flat = [theta.to(dtype).reshape(-1) for theta in thetas]
    norms = [float(torch.linalg.vector_norm(v)) for v in flat]
    units = [v / n for v, n in zip(flat, norms, strict=True) if n > tol]
    if not units:
        return torch.zeros_like(first)
    alpha = 1.0 / len(units)
    mu = sum(alpha * u for u in units)
    mu_norm = float(torch.linalg.vector_norm(mu))
    mu = units[0].clone() if mu_norm < tol else mu / mu_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for u in units:
            cos_omega = float(torch.dot(mu, u).clamp(-1, 1))
            omega = math.acos(cos_omega)
            if omega >= tol:
                tangent += (alpha * omega / math.sin(omega)) * (u - cos_omega * mu)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mu = math.cos(step) * mu + math.sin(step) * (tangent / step)
        mu_norm = float(torch.linalg.vector_norm(mu))
        if mu_norm > tol:
            mu = mu / mu_norm
    return (sum(norms) / count * mu).reshape(first.shape).to(first.dtype)


# --- Fisher-weighted merging ----------------------------------------------------------------------------------


def _fisher_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32: Fisher values span many orders of magnitude and half precision underflows them."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def fisher_merge(
    thetas: Sequence[Tensor],
    fishers: Sequence[Tensor],
    weights: Sequence[float],
    *,
    eps: float = 1e-12,
) -> Tensor:
    """Fisher merging (Matena & Raffel): θ = Σ_k F_k w_k θ_k / Σ_k F_k w_k, with F_k + eps.

    The eps keeps parameters to which no model is sensitive (F = 0 everywhere) at the
    plain weighted average instead of 0/0. Computed in float32 or wider, returned in
    the dtype of ``thetas[0]``. Weights should be positive (a sum of zero divides by zero).
    """
    _require_same_length(thetas=thetas, fishers=fishers, weights=weights)
    dtype = _fisher_dtype(thetas[0], fishers[0])
    numerator: Tensor | None = None
    denominator: Tensor | None = None
    for theta, fisher, w in zip(thetas, fishers, weights, strict=True):
        fw = fisher.to(dtype).add(eps).mul_(float(w))
        term = fw * theta
        numerator = term if numerator is None else numerator.add_(term)
        denominator = fw if denominator is None else denominator.add_(fw)
    assert numerator is not None and denominator is not None
    return numerator.div_(denominator).to(thetas[0].dtype)


def df_merge(
    base: Tensor,
    deltas: Sequence[Tensor],
    fishers: Sequence[Tensor],
    coefficients: Sequence[float],
    *,
    eps: float = 1e-12,
) -> Tensor:
    """DF-Merge (Lee et al., 2025): θ* = θ_base + M · Σ_i F_i λ_i τ_i / Σ_i F_i, with F_i + eps.

    F_i is the diagonal Fisher of the scaled model θ_base + λ_i τ_i (computed
    elsewhere). With all F_i equal the Fisher factors cancel and this is task
    arithmetic with weights λ_i — the reason for the factor M.
    """
    count = _require_same_length(deltas=deltas, fishers=fishers, coefficients=coefficients)
    dtype = _fisher_dtype(base, fishers[0])
    numerator: Tensor | None = None
    denominator: Tensor | None = None
    for delta, fisher, lam_i in zip(deltas, fishers, coefficients, strict=True):
        f = fisher.to(dtype).add(eps)
        term = f * delta
        term.mul_(float(lam_i))
        numerator = term if numerator is None else numerator.add_(term)
        denominator = f if denominator is None else denominator.add_(f)
    assert numerator is not None and denominator is not None
    mixed = numerator.mul_(count).div_(denominator)
    return (base + mixed).to(base.dtype)


def fisher_importance(fishers: Sequence[Tensor], *, eps: float = 1e-12) -> Tensor:
    """Per-parameter model importance I_k = M (F_k + eps) / Σ_j (F_j + eps), stacked ``[M, …]``.

    Why this is the right reweighting: DF-Merge's update can be rewritten as
        M Σ_i F_i λ_i τ_i / Σ_j F_j = Σ_i λ_i (M F_i / Σ_j F_j) τ_i = Σ_i λ_i I_i τ_i,
    i.e. task arithmetic whose weight λ_i is multiplied, parameter by parameter, by
    I_i. The I_k are positive and average to 1 over the models, so they only
    redistribute each parameter's weight towards the models whose loss is most
    sensitive to it. hm3 applies the same substitution w_k → w_k·I_k inside TIES and
    DARE-TIES (sign election and disjoint merge, see :func:`ties`), which
    gives a Fisher-weighted (DARE-)TIES with two exact limits: with F = I (all F_k
    equal) every I_k = 1 and it is plain (DARE-)TIES; with density 1, no sign
    election and no normalisation it is exactly DF-Merge.
    """
    count = _require_same_length(fishers=fishers)
    stacked = torch.stack(list(fishers)).to(_fisher_dtype(*fishers))  # fresh: safe to update in place
    stacked.add_(eps)
    total = stacked.sum(0)
    return stacked.mul_(count).div_(total)
