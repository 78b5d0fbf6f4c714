"""DARE/DELLA drop-mask generators: the recorded draw of older recipes stays bit-identical, the faster one
(``mask_rng: sfc64``) keeps DARE's statistics, and the in-place DARE used by DARE-TIES equals :func:`ops.dare`."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from hm3.config import parse_merge_config
from hm3.errors import ConfigError
from hm3.merge import methods, ops
from hm3.merge.export import mergekit_notes, to_mergekit
from hm3.merge.methods import TensorInputs
from hm3.merge.plan import DEFAULT_MASK_RNG, dare_generator, mask_generator

NAME = "model.layers.0.mlp.up_proj.weight"
GTA = {"normalize": False, "rescale": False, "lambda": 1.0, "rescale_mode": None, "int8_mask": False}


def _dare_ties(base, thetas, density, generators, **params) -> torch.Tensor:
    x = TensorInputs(name=NAME, base=base, tensors=thetas, model_params=[{"weight": 1.0, "density": density}] * 2,
                     params=GTA | params, generators=generators)
    return methods.get_method("dare_ties").fn(x)


# --- the recorded draw (mt19937) ---------------------------------------------------------------------------


def test_a_recipe_without_mask_rng_keeps_the_recorded_draw():
    """Pinned: masks of seed 0 on this tensor (drawn before ``mask_rng`` existed), and the DARE-TIES merge they give.

    τ_0 = i, τ_1 = −2i (i = 1…12), weights 1, no rescale: where model 1 keeps an entry the elected sign is −
    and the merge is −2i; where only model 0 keeps it, i; where neither does, 0.
    """
    recipe = parse_merge_config({"merge_method": "dare_ties", "base_model": "b", "models": [{"model": "m"}]})
    assert recipe.mask_rng is None and DEFAULT_MASK_RNG == "mt19937"
    masks = [[1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1]]
    for k, mask in enumerate(masks):
        draws = torch.rand(12, generator=mask_generator(DEFAULT_MASK_RNG, 0, NAME, k))
        assert (draws < 0.5).int().tolist() == mask
    i = torch.arange(1.0, 13.0)
    merged = _dare_ties(torch.zeros(12), [i, -2 * i], 0.5, lambda k: mask_generator(DEFAULT_MASK_RNG, 0, NAME, k))
    assert merged.tolist() == [1, 2, -6, 4, -10, -12, -14, -16, -18, -20, 0, -24]


def test_mt19937_is_the_dare_generator_of_older_hm3():
    for k in range(2):
        a = torch.rand(64, generator=mask_generator("mt19937", 5, NAME, k))
        assert torch.equal(a, torch.rand(64, generator=dare_generator(5, NAME, k)))


# --- in-place DARE (the DARE-TIES path) equals ops.dare bit for bit ------------------------------------------------


@pytest.mark.parametrize("rng", ["mt19937", "sfc64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.9, 1.0])
def test_in_place_dare_equals_dare(rng, dtype, rescale, density):
    tau = torch.randn(70, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = ops.dare(tau, density, generator=mask_generator(rng, 1, NAME, 0), rescale=rescale)
    work = tau.clone()
    out = ops.dare_(work, density, generator=mask_generator(rng, 1, NAME, 0), rescale=rescale)
    assert out is work and out.dtype == dtype
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))  # bit for bit, signs of zeros included


@pytest.mark.parametrize("rng", ["mt19937", "sfc64"])
def test_dare_ties_equals_dare_then_ties(rng):
    """The stacked in-place DARE-TIES gives the tensors of DARE per model followed by TIES at density 1."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 30, generator=g)
    thetas = [base + 0.1 * torch.randn(40, 30, generator=g) for _ in range(2)]
    gens = lambda k: mask_generator(rng, 3, NAME, k)  # noqa: E731
    merged = _dare_ties(base, thetas, 0.4, gens, rescale=True)
    sparse = [ops.dare(t - base, 0.4, generator=gens(k), rescale="l1") for k, t in enumerate(thetas)]
    expected = ops.ties(base, sparse, [1.0, 1.0], [1.0, 1.0], normalize=False)
    assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))


# --- the sfc64 draw -----------------------------------------------------------------------------------------


def test_sfc64_words_are_numpys_raw_stream_low_word_first():
    """Pinned words of seed 0 on this tensor, and how they are defined: SFC64 seeded by a SeedSequence of the
    first 16 bytes (little-endian) of sha256("0/NAME/0"), each 64-bit output split low word first."""
    words = ops._sfc64_words(mask_generator("sfc64", 0, NAME, 0), 6)
    assert words.tolist() == [1856199376, 1330340299, 4157498307, 1558073887, 2232736536, 3350132747]
    key = int.from_bytes(hashlib.sha256(f"0/{NAME}/0".encode()).digest()[:16], "little")
    raw = np.random.SFC64(np.random.SeedSequence(key)).random_raw(3)
    assert words.tolist() == [int(w) for r in raw for w in (int(r) & 0xFFFFFFFF, int(r) >> 32)]


def test_sfc64_uniforms_are_the_top_24_bits_of_each_word():
    tau = torch.zeros(5)
    u = ops._uniforms(tau, mask_generator("sfc64", 0, NAME, 0))
    words = [1856199376, 1330340299, 4157498307, 1558073887, 2232736536]
    assert u.dtype == torch.float32 and u.tolist() == [(w >> 8) / 2**24 for w in words]


@pytest.mark.parametrize("density", [0.5, 0.3, 1e-3, 0.123456789, 1 - 2**-24, 1 - 1e-9])
def test_sfc64_integer_mask_equals_comparing_the_uniforms(density):
    """DARE-TIES compares the words with an integer threshold; it must keep exactly the entries U < ρ keeps."""
    tau = torch.zeros(200_003)
    mask = ops._sfc64_keep_mask(tau, density, mask_generator("sfc64", 9, NAME, 1))
    uniforms = ops._uniforms(tau, mask_generator("sfc64", 9, NAME, 1))
    assert torch.equal(mask, uniforms < density)


def test_sfc64_integer_mask_agrees_at_densities_on_and_between_the_drawn_values():
    """Densities equal to a drawn U, or off it by less than float32 resolves (rounded to U by the comparison):
    the cases where an integer threshold of the wrong width or rounding would keep a different set."""
    tau = torch.zeros(64)
    uniforms = ops._uniforms(tau, mask_generator("sfc64", 2, NAME, 0))
    for u in uniforms[uniforms > 0.01].tolist():
        for density in (u, u + 2**-27, u - 2**-27, u + 3 * 2**-26):
            mask = ops._sfc64_keep_mask(tau, density, mask_generator("sfc64", 2, NAME, 0))
            assert torch.equal(mask, uniforms < density), density


@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
def test_sfc64_keep_rate_is_the_density(density):
    n = 400_000
    kept = int(ops._sfc64_keep_mask(torch.zeros(n), density, mask_generator("sfc64", 1, NAME, 0)).sum())
    sd = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 5 * sd


def test_sfc64_dare_is_unbiased_over_seeds():
    """DARE's expectation: E[dare(τ, ρ) with 1/ρ rescale] = τ, so E[DARE-linear merge] = the undropped task
    arithmetic merge; checked over 400 seeds with a 5σ tolerance per entry."""
    g = torch.Generator().manual_seed(4)
    base, tau0, tau1 = (torch.randn(64, generator=g) for _ in range(3))
    weights, density, seeds = [0.7, 0.3], 0.3, 400
    total = torch.zeros(64, dtype=torch.float64)
    for s in range(seeds):
        x = TensorInputs(name=NAME, base=base, tensors=[base + tau0, base + tau1],
                         model_params=[{"weight": w, "density": density} for w in weights],
                         params=GTA | {"rescale_mode": "inverse"},
                         generators=lambda k, s=s: mask_generator("sfc64", s, NAME, k))
        total += methods.get_method("dare_linear").fn(x).double()
    undropped = base + weights[0] * tau0 + weights[1] * tau1
    # Var of w·τ·m/ρ is w²τ²(1−ρ)/ρ, summed over the two models
    sd = torch.sqrt(((weights[0] * tau0) ** 2 + (weights[1] * tau1) ** 2) * (1 - density) / density / seeds)
    assert ((total / seeds - undropped.double()).abs() <= 5 * sd.double() + 1e-6).all()


def test_sfc64_is_reproducible_by_seed_and_differs_by_seed_tensor_and_model():
    def mask(seed: int, name: str, k: int) -> torch.Tensor:
        return ops._sfc64_keep_mask(torch.zeros(256), 0.5, mask_generator("sfc64", seed, name, k))

    assert torch.equal(mask(3, NAME, 0), mask(3, NAME, 0))
    assert all(not torch.equal(mask(3, NAME, 0), m) for m in (mask(4, NAME, 0), mask(3, "x", 0), mask(3, NAME, 1)))
    assert not torch.equal(mask(3, NAME, 0), torch.rand(256, generator=dare_generator(3, NAME, 0)) < 0.5)


def test_sfc64_della_keeps_its_probabilities():
    """DELLA draws through the same uniforms: the largest-magnitude half of a row is kept at ρ + ε on average."""
    tau = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(6))
    kept = ops.della(tau, 0.5, 0.2, generator=mask_generator("sfc64", 0, NAME, 0), rescale="none") != 0
    big = tau.abs() > tau.abs().median()
    p = ops.della_probabilities(tau, 0.5, 0.2)
    for part in (big, ~big):
        n, expected = int(part.sum()), float(p[part].sum())
        assert abs(int(kept[part].sum()) - expected) < 5 * math.sqrt(n * 0.25)


# --- draws made ahead (the streaming engine's DrawnAhead) ------------------------------------------------------


def _fresh(rng: str, k: int = 0):
    return lambda: mask_generator(rng, 7, NAME, k)


@pytest.mark.parametrize("rng", ["mt19937", "sfc64"])
def test_a_draw_made_ahead_and_the_draws_after_it_are_the_generators_own(rng):
    tau = torch.zeros(9, 5)
    ahead = ops.DrawnAhead(_fresh(rng), tau.numel())
    plain = _fresh(rng)()
    for _ in range(3):  # the first draw (made ahead), then the stream after it
        assert torch.equal(ops._uniforms(tau, ahead), ops._uniforms(tau, plain))


@pytest.mark.parametrize("rng", ["mt19937", "sfc64"])
def test_a_first_draw_of_another_size_starts_the_stream_afresh(rng):
    """Drawn ahead for 48 entries, asked for 45: the 45 are the stream's first 45 and the next draw continues
    after them (not after the 48 drawn ahead: 24 raw SFC64 outputs against 23, 48 Mersenne draws against 45)."""
    tau = torch.zeros(45)
    ahead = ops.DrawnAhead(_fresh(rng), 48)
    plain = _fresh(rng)()
    assert torch.equal(ops._uniforms(tau, ahead), ops._uniforms(tau, plain))
    assert torch.equal(ops._uniforms(tau, ahead), ops._uniforms(tau, plain))


@pytest.mark.parametrize("rng", ["mt19937", "sfc64"])
def test_the_values_drawn_ahead_are_the_ones_used_not_drawn_again(rng):
    """Drawing ahead exists to take the draw off the merge's path: the mask's first draw is the object made
    ahead (no copy, no second draw from a fresh generator), for DARE's uniforms and sfc64's words alike."""
    tau = torch.zeros(6, 7)
    ahead = ops.DrawnAhead(_fresh(rng), tau.numel())
    made = ahead._ahead
    if rng == "sfc64":
        assert ops._words(ahead, tau.numel()) is made
    else:
        assert ops._uniforms(tau, ahead).data_ptr() == made.data_ptr()


@pytest.mark.parametrize("rng", ["mt19937", "sfc64"])
def test_dare_into_a_buffer_gives_the_values_it_returns_otherwise(rng):
    tau = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    buffer = torch.empty_like(tau)
    out = ops.dare(tau, 0.5, generator=mask_generator(rng, 2, NAME, 0), out=buffer)
    assert out is buffer
    assert torch.equal(out, ops.dare(tau, 0.5, generator=mask_generator(rng, 2, NAME, 0)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_entry_drawn_exactly_at_the_density_is_dropped_in_every_dtype(dtype):
    """m = [U < ρ]: a draw equal to ρ drops its entry, in the float32 path (``lt_``) and in the others alike
    (the density is set to the first draw itself, so entry 0 sits exactly on the boundary)."""
    tau = torch.randn(50, generator=torch.Generator().manual_seed(8)).to(dtype)
    density = float(torch.rand(50, generator=mask_generator("mt19937", 4, NAME, 0))[0])
    kept = ops.dare(tau, density, generator=mask_generator("mt19937", 4, NAME, 0), rescale="none") != 0
    kept32 = ops.dare(tau.float(), density, generator=mask_generator("mt19937", 4, NAME, 0), rescale="none") != 0
    assert not kept[0] and torch.equal(kept, kept32)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_kept_l1_norm_of_exactly_the_threshold_is_still_rescaled(in_place):
    """mergekit rescales unless a norm is *below* 1e-7 (compared in float32): with τ = (ε, ε), ε = float32(1e-7),
    and one entry kept, ‖kept‖₁ is exactly the threshold and the kept entry doubles."""
    eps = float(torch.tensor(ops.L1_RESCALE_EPS, dtype=torch.float32))
    tau = torch.tensor([eps, eps])
    seed = next(s for s in range(100) if int((torch.rand(2, generator=mask_generator("mt19937", s, NAME, 0)) < 0.5)
                                             .sum()) == 1)
    gen = mask_generator("mt19937", seed, NAME, 0)
    kept = ops.dare_(tau.clone(), 0.5, generator=gen) if in_place else ops.dare(tau, 0.5, generator=gen)
    assert sorted(kept.tolist()) == [0.0, float(torch.tensor(2 * eps, dtype=torch.float32))]


@pytest.mark.parametrize("rng", ["mt19937", "sfc64"])
@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_a_random_merge_with_its_draws_made_ahead_is_bit_identical(rng, method):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 20, generator=g)
    thetas = [base + 0.1 * torch.randn(30, 20, generator=g) for _ in range(2)]
    params = [{"weight": 0.6, "density": 0.4, "epsilon": 0.1}, {"weight": 0.4, "density": 0.7, "epsilon": 0.2}]

    def merge(generators):
        x = TensorInputs(name=NAME, base=base, tensors=thetas, model_params=params, generators=generators,
                         params=GTA | {"rescale": True})
        return methods.get_method(method).fn(x)

    expected = merge(lambda k: mask_generator(rng, 7, NAME, k))
    merged = merge(lambda k: ops.DrawnAhead(_fresh(rng, k), base.numel()))
    assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize(("rng", "budget", "densities"), [("mt19937", None, (0.3, 0.8)), ("sfc64", None, (0.3, 0.8)),
                                                        ("mt19937", 4096, (0.3, 0.8)), ("mt19937", None, (0.3, 1.0)),
                                                        ("sfc64", 4096, (0.0, 0.6))])
def test_the_streaming_engine_merges_what_it_merges_without_drawing_ahead(tmp_path, monkeypatch, rng, budget,
                                                                         densities):
    """``hm3 merge`` draws each tensor's masks while the tensor before merges: every tensor it writes equals the
    method run on the same inputs with the generators made on the spot (the order of models kept). Tensors whose
    draws exceed the memory budget are drawn on the spot, and only they; a model of density 1 or 0 draws
    nothing, so nothing is drawn ahead for it."""
    from hm3.merge import engine

    made: list[int] = []
    real_drawn_ahead = engine.DrawnAhead

    def spy(make, numel):
        made.append(numel)
        return real_drawn_ahead(make, numel)

    monkeypatch.setattr(engine, "DrawnAhead", spy)
    if budget is not None:
        monkeypatch.setattr(engine, "DRAW_AHEAD_BYTES", budget)
    from safetensors.torch import load_file

    from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
    from hm3.merge.engine import _load_job_inputs, merge_to_disk, run_job
    from hm3.merge.plan import plan_merge

    base = build_random_llama(tmp_path / "base", hidden_size=32, num_layers=2, vocab_size=64, seed=0)
    models = [build_finetuned_variant(base, tmp_path / f"m{i}", seed=i, scale=0.05) for i in (1, 2)]
    recipe = parse_merge_config({
        "merge_method": "dare_ties", "base_model": str(base), "seed": 3, "mask_rng": rng,
        "models": [{"model": str(m), "parameters": {"weight": w, "density": d}}
                   for m, w, d in zip(models, (0.7, 0.5), densities, strict=True)],
    })
    merge_to_disk(recipe, tmp_path / "out")
    written = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(f))
    plan = plan_merge(recipe)
    try:
        for job in plan.jobs:
            expected = run_job(plan, job, *_load_job_inputs(plan, job, None, torch.device("cpu")))
            assert torch.equal(written[job.name], expected), job.name
        sizes = [math.prod(plan.output_shape(job)) for job in plan.jobs]
    finally:
        plan.close()
    drawing = sum(0 < d < 1 for d in densities)
    limit = (budget if budget is not None else engine.DRAW_AHEAD_BYTES) // (4 * drawing)  # entries, models drawing
    assert sorted(made) == sorted(n for n in sizes for _ in range(drawing) if n <= limit)
    assert budget is None or any(n > limit for n in sizes) and any(n <= limit for n in sizes)


# --- recipes and export ----------------------------------------------------------------------------------------


def test_mask_rng_is_checked_and_exported_as_a_note():
    base = {"merge_method": "dare_ties", "base_model": "b", "models": [{"model": "m"}], "seed": 4}
    with pytest.raises(ConfigError, match="mask_rng"):
        parse_merge_config(base | {"mask_rng": "philox"})
    recipe = parse_merge_config(base | {"mask_rng": "sfc64"})
    assert "mask_rng" not in to_mergekit(recipe) and "seed" not in to_mergekit(recipe)
    assert any("mask_rng sfc64" in line for line in mergekit_notes(recipe, "x.yml"))
    assert any("mask_rng mt19937" in line for line in mergekit_notes(parse_merge_config(base), "x.yml"))
    with pytest.raises(ConfigError, match="mask_rng 'philox' is not one of mt19937, sfc64"):
        mask_generator("philox", 0, NAME, 0)
