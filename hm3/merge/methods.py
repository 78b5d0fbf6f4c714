"""The merge-method registry: name -> parameter spec + per-tensor function.

Each method is a thin adapter from resolved recipe numbers to the pure
equations in :mod:`hm3.merge.ops`; it never reads files or picks devices. The
defaults equal mergekit 0.1.5's for the methods both tools have, so a mergekit
config means the same thing in hm3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hm3.errors import ConfigError
from hm3.merge import ops

#: Weights beyond this magnitude are refused as almost certainly typos.
MAX_ABS_WEIGHT = 10.0
RESCALE_MODES = ("l1", "inverse", "none")


def _check_weight(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"must be a number, got {v!r}"
    return None if abs(v) <= MAX_ABS_WEIGHT else f"must lie in [-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}], got {v}"


def _check_density(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"must be a number, got {v!r}"
    return None if 0.0 <= v <= 1.0 else f"must lie in [0, 1], got {v}"


def _check_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _check_number(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) else f"must be a number, got {v!r}"


def _check_rescale_mode(v: Any) -> str | None:
    return None if v in RESCALE_MODES else f"must be one of {', '.join(RESCALE_MODES)}, got {v!r}"


def _check_count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else f"must be a whole number ≥ 0, got {v!r}"


def _check_positive(v: Any) -> str | None:
    problem = _check_number(v)
    return problem or (None if v > 0 else f"must be > 0, got {v}")


def _check_path(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"must be a path to a safetensors file, got {v!r}"


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter: where it lives, its default and its validity check."""

    name: str
    default: Any
    check: Callable[[Any], str | None]
    required: bool = False
    hm3_only: bool = False  # not part of mergekit's schema: blocks export to mergekit
    #: the number type a value is read as before ``check``, as mergekit reads it (YAML's ``1e-3`` is the string
    #: "1e-3", a float here; a gradient of whole numbers ends as one for ``int``); None (bools, strings): as given
    value_type: Any = float
    #: the range a level-1 search explores by default (inside what ``check`` accepts); None: a search gives
    #: it no default range (weight and density take the search space's own per-model bounds)
    search_bounds: tuple[float, float] | None = None


@dataclass(frozen=True)
class TensorInputs:
    """Everything a method needs for one output tensor, already resolved to numbers."""

    name: str
    base: torch.Tensor | None
    tensors: Sequence[torch.Tensor]  # the non-base models (all models for ``linear``/``fisher``)
    model_params: Sequence[dict[str, Any]]
    params: dict[str, Any]
    fishers: Sequence[torch.Tensor] | None = None
    generators: Callable[[int], ops.MaskGenerator] | None = None  # DARE/DELLA: per-model seeded RNG
    deltas: Sequence[torch.Tensor] | None = None  # precomputed task vectors (in-memory path)


MergeFn = Callable[[TensorInputs], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    needs_base: bool
    params: tuple[ParamSpec, ...]
    model_params: tuple[ParamSpec, ...]
    uses_randomness: bool = False
    supports_fisher: bool = False
    requires_fisher: bool = False
    mergekit_name: str | None = None  # None: mergekit cannot express it
    reference: str = ""  # the paper or documentation the method follows
    optional_base: bool = False  # a base_model, when given, is subtracted first (nuslerp); needs_base: always
    min_models: int = 1  # models the method merges, not counting the base when it takes one
    max_models: int | None = None
    #: a check across one model's parameters for one tensor (della's density ± epsilon): the problem, or None
    check_model: Callable[[dict[str, Any]], str | None] | None = None
    #: whether the in-memory merger that searches use (:mod:`hm3.merge.inmemory`, base + task vectors)
    #: can run it: its function reads only the base, the task vectors τ_k and Fisher tensors, never the
    #: models' own weights (slerp and model_stock read those, linear and karcher have no base)
    in_memory: bool = False
    #: the parameters besides each model's weight that a level-1 search space varies for this method
    #: (:mod:`hm3.search.space`); None: level 1 cannot search it (not a weighted task-vector method that the
    #: in-memory merger runs, or one that needs Fisher tensors)
    searched: tuple[str, ...] | None = None
    doc: str = field(default="", compare=False)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def model_param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.model_params if p.name == name), None)


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, **spec: Any) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` as merge method ``name`` (mergekit-style decorator registry)."""

    def register(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise RuntimeError(f"merge method {name!r} registered twice")
        MERGE_METHODS[name] = MergeMethod(name=name, fn=fn, doc=(fn.__doc__ or "").strip(), **spec)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(MERGE_METHODS))
        raise ConfigError(f"unknown merge_method {name!r}; known methods: {known}") from None


def all_parameter_names() -> set[str]:
    return {p.name for m in MERGE_METHODS.values() for p in (*m.params, *m.model_params)}


# --- parameter sets ------------------------------------------------------------------------------------

WEIGHT = ParamSpec("weight", None, _check_weight, required=True)
DENSITY = ParamSpec("density", 1.0, _check_density)
FISHER = ParamSpec("fisher", None, _check_path, hm3_only=True, value_type=None)
# search ranges: around mergekit's defaults (λ 1, γ 0.01, ε 0.15), within the values the methods' papers tune
LAMBDA = ParamSpec("lambda", 1.0, _check_number, search_bounds=(0.5, 1.5))
INT8_MASK = ParamSpec("int8_mask", False, _check_bool, value_type=None)  # mask dtype only: no effect on the result
RESCALE_MODE = ParamSpec("rescale_mode", None, _check_rescale_mode, hm3_only=True, value_type=None)
GAMMA = ParamSpec("gamma", 0.01, _check_density, search_bounds=(0.0, 0.1))  # breadcrumbs: the fraction of largest |τ| dropped
EPSILON = ParamSpec("epsilon", 0.15, _check_density, search_bounds=(0.0, 0.2))  # della: the spread of keep probabilities around density


def _gta_params(*, normalize: bool, rescale: bool, rescale_modes: bool = True) -> tuple[ParamSpec, ...]:
    """mergekit's generalized task arithmetic parameters; ``rescale_modes``: hm3's ``rescale_mode`` too."""
    return (
        ParamSpec("normalize", normalize, _check_bool, value_type=None),
        ParamSpec("rescale", rescale, _check_bool, value_type=None),
        LAMBDA,
        INT8_MASK,
    ) + ((RESCALE_MODE,) if rescale_modes else ())


def _weights(x: TensorInputs) -> list[float]:
    return [float(p["weight"]) for p in x.model_params]


def _densities(x: TensorInputs) -> list[float]:
    return [float(p["density"]) for p in x.model_params]


def _rescale(x: TensorInputs) -> str:
    """hm3's ``rescale_mode`` wins; otherwise mergekit's boolean ``rescale`` (true = L1)."""
    mode = x.params.get("rescale_mode")
    if mode is not None:
        return mode
    return "l1" if x.params["rescale"] else "none"


def _importance(x: TensorInputs) -> torch.Tensor | None:
    return ops.fisher_importance(x.fishers) if x.fishers is not None else None


def _deltas(x: TensorInputs) -> list[torch.Tensor]:
    if x.deltas is not None:
        return list(x.deltas)
    assert x.base is not None
    return [ops.task_vector(t, x.base) for t in x.tensors]


def _gta_options(x: TensorInputs) -> dict[str, Any]:
    return {"normalize": x.params["normalize"], "lam": float(x.params["lambda"]), "importance": _importance(x)}


def _dare_deltas(x: TensorInputs) -> list[torch.Tensor]:
    assert x.generators is not None
    mode = _rescale(x)
    return [
        ops.dare(d, dens, generator=x.generators(k), rescale=mode)
        for k, (d, dens) in enumerate(zip(_deltas(x), _densities(x), strict=True))
    ]


def _dare_stack(x: TensorInputs) -> torch.Tensor | None:
    """DARE's sparsified task vectors stacked ``[M, …]``, built in place (:func:`ops.dare_`), or None when the
    inputs' dtypes differ from the base's (then :func:`_dare_deltas` keeps the promotion rules)."""
    assert x.base is not None and x.generators is not None
    sources = x.deltas if x.deltas is not None else x.tensors
    if any(t.dtype != x.base.dtype for t in sources):
        return None
    stacked = torch.stack(list(sources)) if x.deltas is not None else ops.stacked_task_vectors(x.base, x.tensors)
    scratch = torch.empty_like(stacked[0]) if stacked.dtype == torch.float32 else None
    mode = _rescale(x)
    for k, (row, dens) in enumerate(zip(stacked, _densities(x), strict=True)):
        ops.dare_(row, dens, generator=x.generators(k), rescale=mode, scratch=scratch)
    return stacked


def _breadcrumbs_deltas(x: TensorInputs) -> list[torch.Tensor]:
    mode = _rescale(x)
    return [
        ops.breadcrumbs(d, float(p["density"]), float(p["gamma"]), rescale=mode)
        for d, p in zip(_deltas(x), x.model_params, strict=True)
    ]


def _della_deltas(x: TensorInputs) -> list[torch.Tensor]:
    assert x.generators is not None
    mode = _rescale(x)
    return [
        ops.della(d, float(p["density"]), float(p["epsilon"]), generator=x.generators(k), rescale=mode)
        for k, (d, p) in enumerate(zip(_deltas(x), x.model_params, strict=True))
    ]


def _check_della(model_params: dict[str, Any]) -> str | None:
    return ops.della_problem(float(model_params["density"]), float(model_params["epsilon"]))


def _sign_consensus(x: TensorInputs, sparse: list[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election and disjoint merge of already-sparsified task vectors (no further trim)."""
    return ops.ties(x.base, sparse, _weights(x), [1.0] * len(sparse), **_gta_options(x))


# --- the methods ------------------------------------------------------------------------------------


def _check_scale(v: Any) -> str | None:
    return None if v is None else _check_number(v)


@merge_method(
    "passthrough",
    needs_base=False,
    max_models=1,
    params=(),
    # mergekit's default: no scale (the tensor unchanged, not multiplied by 1)
    model_params=(ParamSpec("scale", None, _check_scale),),
    mergekit_name="passthrough",
    reference="https://github.com/arcee-ai/mergekit",
)
def _passthrough(x: TensorInputs) -> torch.Tensor:
    """θ = s·θ_1: one model's tensor, times its ``scale`` when given (frankenmerges, depth up-scaling)."""
    (tensor,) = x.tensors
    scale = x.model_params[0]["scale"]
    return tensor if scale is None else tensor * scale


@merge_method(
    "linear",
    needs_base=False,
    reference="https://arxiv.org/abs/2203.05482",
    params=(ParamSpec("normalize", True, _check_bool, value_type=None),),
    model_params=(WEIGHT,),
    mergekit_name="linear",
)
def _linear(x: TensorInputs) -> torch.Tensor:
    """θ = Σ_k w_k θ_k (/ Σ_k w_k when normalize)."""
    return ops.linear(x.tensors, _weights(x), normalize=x.params["normalize"])


@merge_method(
    "task_arithmetic",
    needs_base=True,
    in_memory=True,
    reference="https://arxiv.org/abs/2212.04089",
    params=_gta_params(normalize=False, rescale=False),
    model_params=(WEIGHT, FISHER),
    supports_fisher=True,
    mergekit_name="task_arithmetic",
    searched=(),
)
def _task_arithmetic(x: TensorInputs) -> torch.Tensor:
    """θ = θ_base + λ Σ_k w_k τ_k; with Fisher tensors, DF-Merge's weighting."""
    return ops.task_arithmetic(x.base, _deltas(x), _weights(x), **_gta_options(x))


@merge_method(
    "ties",
    needs_base=True,
    in_memory=True,
    reference="https://arxiv.org/abs/2306.01708",
    params=_gta_params(normalize=True, rescale=False),
    model_params=(WEIGHT, DENSITY, FISHER),
    supports_fisher=True,
    mergekit_name="ties",
    searched=("density",),
)
def _ties(x: TensorInputs) -> torch.Tensor:
    """TIES: trim to top-density magnitude, elect sign, disjoint (weighted) mean."""
    mode = _rescale(x)
    if mode not in ("none", "l1"):
        raise ConfigError(f"ties: rescale_mode {mode!r} is for random drops; a magnitude trim takes 'l1' or 'none'")
    return ops.ties(x.base, _deltas(x), _weights(x), _densities(x), rescale_l1=mode == "l1", **_gta_options(x))


@merge_method(
    "dare_ties",
    needs_base=True,
    in_memory=True,
    reference="https://arxiv.org/abs/2311.03099",
    params=_gta_params(normalize=False, rescale=True),
    model_params=(WEIGHT, DENSITY, FISHER),
    uses_randomness=True,
    supports_fisher=True,
    mergekit_name="dare_ties",
    searched=("density",),
)
def _dare_ties(x: TensorInputs) -> torch.Tensor:
    """DARE random drop + rescale, then TIES sign election and disjoint merge."""
    stacked = _dare_stack(x)
    if stacked is None:
        return _sign_consensus(x, _dare_deltas(x))
    return ops.sign_consensus_merge(x.base, stacked, _weights(x), **_gta_options(x))


@merge_method(
    "dare_linear",
    needs_base=True,
    in_memory=True,
    reference="https://arxiv.org/abs/2311.03099",
    params=_gta_params(normalize=False, rescale=True),
    model_params=(WEIGHT, DENSITY, FISHER),
    uses_randomness=True,
    supports_fisher=True,
    mergekit_name="dare_linear",
    searched=("density",),
)
def _dare_linear(x: TensorInputs) -> torch.Tensor:
    """DARE random drop + rescale, then task arithmetic."""
    return ops.task_arithmetic(x.base, _dare_deltas(x), _weights(x), **_gta_options(x))


@merge_method(
    "fisher",
    needs_base=False,
    reference="https://arxiv.org/abs/2111.09832",
    params=(),
    model_params=(WEIGHT, FISHER),
    supports_fisher=True,
    requires_fisher=True,
)
def _fisher(x: TensorInputs) -> torch.Tensor:
    """Fisher merging: θ = Σ_k F_k w_k θ_k / Σ_k F_k w_k."""
    assert x.fishers is not None
    return ops.fisher_merge(x.tensors, x.fishers, _weights(x))


@merge_method(
    "df_merge",
    needs_base=True,
    in_memory=True,
    params=(),
    model_params=(WEIGHT, FISHER),
    supports_fisher=True,
    requires_fisher=True,
)
def _df_merge(x: TensorInputs) -> torch.Tensor:
    """DF-Merge: θ_base + M Σ_i F_i(λ_i) λ_i τ_i / Σ_i F_i(λ_i), with λ_i = the model's weight."""
    assert x.fishers is not None
    return ops.df_merge(x.base, _deltas(x), x.fishers, _weights(x))  # in the base's dtype


@merge_method(
    "slerp",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(ParamSpec("t", None, _check_density, required=True),),
    model_params=(),
    mergekit_name="slerp",
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def _slerp(x: TensorInputs) -> torch.Tensor:
    """θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ_1, Ω the angle between the two tensors."""
    assert x.base is not None
    (other,) = x.tensors
    return ops.slerp(float(x.params["t"]), x.base, other)


@merge_method(
    "model_stock",
    needs_base=True,
    min_models=2,
    params=(ParamSpec("filter_wise", False, _check_bool, value_type=None),),
    model_params=(),
    mergekit_name="model_stock",
    reference="https://arxiv.org/abs/2403.19522",
)
def _model_stock(x: TensorInputs) -> torch.Tensor:
    """Model Stock: θ = t·mean_k θ_k + (1−t)·θ_base, t = N cos φ / (1 + (N−1) cos φ), φ the task vectors' angle."""
    assert x.base is not None
    return ops.model_stock(x.base, x.tensors, filter_wise=x.params["filter_wise"])


_BREADCRUMBS: dict[str, Any] = {
    "needs_base": True,
    "in_memory": True,
    "params": _gta_params(normalize=False, rescale=False, rescale_modes=False),
    "model_params": (WEIGHT, DENSITY, GAMMA),
    "reference": "https://arxiv.org/abs/2312.06795",
    "searched": ("density", "gamma"),
}


@merge_method("breadcrumbs", mergekit_name="breadcrumbs", **_BREADCRUMBS)
def _breadcrumbs(x: TensorInputs) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest γ and the smallest 1−ρ−γ of each |τ_k|, then task arithmetic."""
    return ops.task_arithmetic(x.base, _breadcrumbs_deltas(x), _weights(x), **_gta_options(x))


@merge_method("breadcrumbs_ties", mergekit_name="breadcrumbs_ties", **_BREADCRUMBS)
def _breadcrumbs_ties(x: TensorInputs) -> torch.Tensor:
    """Model Breadcrumbs' sparsification, then TIES sign election and disjoint merge."""
    return _sign_consensus(x, _breadcrumbs_deltas(x))


_DELLA: dict[str, Any] = {
    "needs_base": True,
    "in_memory": True,
    "model_params": (WEIGHT, DENSITY, EPSILON),
    "uses_randomness": True,
    "check_model": _check_della,
    "reference": "https://arxiv.org/abs/2406.11617",
    "searched": ("density", "epsilon", "lambda"),
}


@merge_method("della", mergekit_name="della", params=_gta_params(normalize=True, rescale=True), **_DELLA)
def _della(x: TensorInputs) -> torch.Tensor:
    """DELLA: drop τ_k's entries with probabilities ρ ± ε ranked by magnitude, rescale, then TIES' sign merge."""
    return _sign_consensus(x, _della_deltas(x))


@merge_method("della_linear", mergekit_name="della_linear", params=_gta_params(normalize=False, rescale=True),
              **_DELLA)
def _della_linear(x: TensorInputs) -> torch.Tensor:
    """DELLA's magnitude-ranked random drop + rescale, then task arithmetic."""
    return ops.task_arithmetic(x.base, _della_deltas(x), _weights(x), **_gta_options(x))


@merge_method(
    "nuslerp",
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
    params=(ParamSpec("nuslerp_flatten", True, _check_bool, value_type=None),
            ParamSpec("nuslerp_row_wise", False, _check_bool, value_type=None)),
    model_params=(WEIGHT,),
    mergekit_name="nuslerp",
    reference="https://github.com/arcee-ai/mergekit",
)
def _nuslerp(x: TensorInputs) -> torch.Tensor:
    """NuSLERP: SLERP of two models (or, with a base, of their task vectors) by rows, columns or whole, t = w_2/Σw."""
    t = ops.nuslerp_t(_weights(x))
    options = {"flatten": x.params["nuslerp_flatten"], "row_wise": x.params["nuslerp_row_wise"]}
    first, second = x.tensors
    if x.base is None:
        return ops.nuslerp(t, first, second, **options)
    tau1, tau2 = _deltas(x)
    return (x.base + ops.nuslerp(t, tau1, tau2, **options)).to(x.base.dtype)


@merge_method(
    "multislerp",
    needs_base=False,
    optional_base=True,
    params=(ParamSpec("normalize_weights", True, _check_bool, value_type=None),
            ParamSpec("eps", 1e-8, _check_positive)),
    model_params=(WEIGHT,),
    mergekit_name="multislerp",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def _multislerp(x: TensorInputs) -> torch.Tensor:
    """Multi-SLERP: the weighted spherical mean of the models' (with a base, their task vectors') directions, at their weighted norm."""
    if x.base is not None and len(x.tensors) == 1:
        return x.tensors[0]  # as mergekit: a lone model's own tensor, the base not involved
    options = {"normalize_weights": x.params["normalize_weights"], "eps": float(x.params["eps"])}
    try:
        if x.base is None:
            return ops.multislerp(x.tensors, _weights(x), **options)
        return (x.base + ops.multislerp(_deltas(x), _weights(x), **options)).to(x.base.dtype)
    except ConfigError as err:
        raise ConfigError(f"tensor {x.name!r}: {err}") from None


@merge_method(
    "nearswap",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(ParamSpec("t", None, _check_number, required=True),),
    model_params=(),
    mergekit_name="nearswap",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
def _nearswap(x: TensorInputs) -> torch.Tensor:
    """θ = w·θ_1 + (1−w)·θ_base per entry, w = clamp(t / |θ_base − θ_1|, 0, 1): the other model where it is near the base."""
    assert x.base is not None
    (other,) = x.tensors
    return ops.nearswap(float(x.params["t"]), x.base, other)


_RAM: dict[str, Any] = {"needs_base": True, "model_params": (), "reference": "https://arxiv.org/abs/2601.13572"}


@merge_method("ram", params=(ParamSpec("epsilon", 1e-5, _check_positive),), mergekit_name="ram", **_RAM)
def _ram(x: TensorInputs) -> torch.Tensor:
    """RAM: θ = θ_base + Σ_k τ̃_k / max(c, 1), τ̃_k = τ_k where |τ_k| > ε, c the models that changed the entry."""
    assert x.base is not None
    return ops.ram(x.base, _deltas(x), epsilon=float(x.params["epsilon"]))


@merge_method("ramplus_tl", mergekit_name="ramplus_tl",
              params=(ParamSpec("r", 0.1, _check_number), ParamSpec("alpha", 0.2, _check_number),
                      ParamSpec("epsilon", 1e-5, _check_positive)), **_RAM)
def _ramplus_tl(x: TensorInputs) -> torch.Tensor:
    """RAM+ (tensor-local): RAM, each model's unique changes scaled by 1 + r·min(ρ_k, α), ρ_k its shared/unique count."""
    assert x.base is not None
    return ops.ram_plus(x.base, _deltas(x), r=float(x.params["r"]), alpha=float(x.params["alpha"]),
                        epsilon=float(x.params["epsilon"]))


@merge_method("arcee_fusion", needs_base=True, min_models=1, max_models=1, params=(), model_params=(),
              mergekit_name="arcee_fusion", reference="https://github.com/arcee-ai/mergekit")
def _arcee_fusion(x: TensorInputs) -> torch.Tensor:
    """Arcee Fusion: θ_base + (θ_1 − θ_base) where |Δ|·KL(softmax θ_1 ‖ softmax θ_base) is an upper outlier, else θ_base."""
    assert x.base is not None
    (other,) = x.tensors
    return ops.arcee_fusion(x.base, other)


@merge_method(
    "sce",
    needs_base=True,
    in_memory=True,
    params=(ParamSpec("select_topk", 1.0, _check_density), INT8_MASK),
    model_params=(),
    mergekit_name="sce",
    reference="https://arxiv.org/abs/2408.07990",
)
def _sce(x: TensorInputs) -> torch.Tensor:
    """SCE: keep the highest-variance entries, weight τ_k by its mean square, merge the sign-agreeing ones."""
    return ops.sce(x.base, _deltas(x), select_topk=float(x.params["select_topk"]))


@merge_method(
    "karcher",
    needs_base=False,
    params=(ParamSpec("max_iter", 10, _check_count, value_type=int), ParamSpec("tol", 1e-5, _check_positive)),
    model_params=(),
    mergekit_name="karcher",
    reference="https://arxiv.org/abs/2603.04972",
)
def _karcher(x: TensorInputs) -> torch.Tensor:
    """Karcher mean: the models' mean norm times the Riemannian mean of their directions on the unit sphere."""
    return ops.karcher(x.tensors, max_iter=int(x.params["max_iter"]), tol=float(x.params["tol"]))
