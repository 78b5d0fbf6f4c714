"""The level-1 search space: a point of the unit cube <-> an hm3 merge recipe.

Every optimiser works in ``[0, 1]^d`` (GPs, Sobol designs and NSGA-II all assume a
box, and a unit box needs no per-optimiser scaling); :meth:`SearchSpace.to_recipe`
is the only place that maps a unit-cube point to physical weights and densities
inside the configured bounds. The recipe is a plain dict in mergekit's schema
(``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``seed``), so a front point can be stored, re-merged by ``hm3 merge`` and, when no
hm3-only key is used, run unchanged by ``mergekit-yaml``.

Vector layout (see :meth:`SearchSpace.param_names`): all weights first, then all
densities (when searched), each ordered model-major then layer group. A space that
lists ``methods`` appends the listed methods' own parameters, then the method (below).

Per-layer-group values (``layer_granularity = g``, as mergekit-evolve's option)
are written as mergekit ``filter`` conditions: one ``{filter: "layers.{i}.", value}``
per layer ``i`` (mergekit matches filters as substrings, and the trailing dot keeps
``layers.1.`` from matching ``layers.11.``), followed by an unfiltered condition for
the tensors outside the layers (embeddings, final norm, LM head). Those take the
first group's value, which is what mergekit's own depth rule (``t = 0``) gives them.

**The merge method as a dimension.** ``methods: [dare_ties, della, breadcrumbs_ties]``
lets the search choose the method too. The categorical becomes *one* coordinate cut
into M equal bins, the last of the vector: ``u`` in ``[i/M, (i+1)/M)`` picks the
i-th listed method (``u = 1`` the last). The vector holds the union of the listed
methods' parameters (:attr:`hm3.merge.methods.MergeMethod.searched`): the weights and
densities, shared by every method that has them (they mean the same thing in each),
then every further parameter once by name, per model and layer group for a model
parameter (della's ``epsilon``, breadcrumbs' ``gamma``; della and della_linear share
one ``epsilon``), a single coordinate for a global one (della's ``lambda``). A
point's recipe takes its method's parameters and ignores the rest (*inactive*
coordinates), so points that differ only there are one candidate, scored once.

Why this encoding: every optimiser (Sobol, NSGA-II, the BO variants, hm3-fixed) and
the ``level1_tell`` events a resume replays already speak the unit cube, so the method
costs one box dimension and nothing else changes; decoding is a pure function of the
point, so a resumed search decodes what it told. Sobol designs give each method an
equal share of points, and NSGA-II's crossover and mutation cross bins as they move
along any coordinate. One-hot coordinates would need rounding rules in every
optimiser, and a mixed categorical kernel would serve BO alone.

Its consequence for the GP: the surrogate (a stationary Matérn kernel with one length
scale per coordinate) treats the method coordinate as continuous. The objective is
piecewise constant along it and jumps at bin edges, which the GP fits only with a
short length scale there; its smoothness also makes neighbouring bins (the listed
order) look alike, an order that means nothing. Inactive coordinates leave the
objective unchanged within a bin, but their one length scale is shared by all bins,
so, e.g., ``epsilon`` looks only as relevant as the della points show. Both cost
sample efficiency, not correctness: every point decodes to one valid recipe, and
every stored score belongs to the recipe that was merged. With a few methods and
tens of evaluations that is the simple choice; with budget to spare, one search per
method models each more sharply.

della's keep probabilities ``ρ ± ε`` must lie strictly inside (0, 1), a bound that
moves with the density. ``epsilon`` is searched within its bounds ``[lo, hi]`` and
then scaled by ``min(1, EPSILON_ROOM · min(ρ, 1 − ρ) / hi)`` (:func:`della_epsilon`):
where ρ leaves room for ``hi``, the recipe holds the searched value; elsewhere the whole
range shrinks in proportion, so every point is a valid della recipe and ε stays
monotone in its coordinate (no flat clipped region for the GP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_serializer, model_validator

from hm3.config_model import ConfigModel
from hm3.errors import ConfigError, invalid_config
from hm3.merge.inmemory import in_memory_refusal
from hm3.merge.methods import MERGE_METHODS, MergeMethod, ParamSpec
from hm3.merge.ops import della_problem

Bounds = tuple[float, float]
#: Tolerance for unit-cube coordinates produced by floating-point optimisers.
UNIT_TOLERANCE = 1e-9
#: The coordinate that picks the method, in a space that lists several.
METHOD = "method"
#: della's ε may take at most this share of the room the density leaves, min(ρ, 1 − ρ) (module docstring).
EPSILON_ROOM = 0.9


def layer_group_filters(num_layers: int, granularity: int) -> list[list[str]]:
    """Tensor-name filters of each group of ``granularity`` consecutive layers.

    ``layer_group_filters(4, 2) == [["layers.0.", "layers.1."], ["layers.2.", "layers.3."]]``.
    Like mergekit-evolve, the layer count must be a multiple of the granularity, so
    every group has the same size and the same meaning across models.
    """
    if num_layers < 1 or granularity < 1:
        raise ConfigError(f"num_layers ({num_layers}) and layer_granularity ({granularity}) must be >= 1")
    if num_layers % granularity:
        raise ConfigError(f"layer_granularity {granularity} does not divide the model's {num_layers} layers")
    return [
        [f"layers.{i}." for i in range(start, start + granularity)]
        for start in range(0, num_layers, granularity)
    ]


def _check_bounds(name: str, bounds: Bounds, lo_limit: float, hi_limit: float) -> None:
    lo, hi = bounds
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN passes every comparison below
        raise ValueError(f"{name} [{lo}, {hi}] must be finite")
    if lo > hi:
        raise ValueError(f"{name} [{lo}, {hi}] is reversed: the lower bound exceeds the upper")
    if lo < lo_limit or hi > hi_limit:
        raise ValueError(f"{name} [{lo}, {hi}] must lie within [{lo_limit}, {hi_limit}]")


def _epsilon_scale(density: float, upper: float) -> float:
    """The factor della's searched ε is scaled by at density ρ (module docstring); 0 where ρ leaves no room."""
    room = EPSILON_ROOM * min(density, 1.0 - density)
    if room <= 0:
        return 0.0
    return 1.0 if upper <= room else room / upper


def della_epsilon(searched: float, density: float, upper: float) -> float:
    """della's ε for density ρ, from the searched value in ``[lo, upper]``: ρ ± ε strictly inside (0, 1)
    (0 where float rounding would put it on an edge, which only a ρ within ~1e-16 of 0 or 1 can)."""
    eps = searched * _epsilon_scale(density, upper)
    return 0.0 if della_problem(density, eps) else eps


def searchable_methods() -> list[str]:
    """The registry's methods a level-1 search space can list (those with :attr:`MergeMethod.searched`)."""
    return sorted(name for name, m in MERGE_METHODS.items() if m.searched is not None)


def _unsearchable(name: str) -> str | None:
    """Why method ``name`` cannot be listed under ``methods``, or None."""
    known = ", ".join(searchable_methods())
    method = MERGE_METHODS.get(name)
    if method is None:
        return f"unknown merge method {name!r}; level 1 searches: {known}"
    if method.searched is not None:
        return None
    refusal = in_memory_refusal(method)
    if refusal is not None:
        return f"{refusal}; level 1 searches: {known}"
    if method.requires_fisher:
        why = "needs Fisher tensors (search it alone with fisher: true and df_merge: true)"
    else:
        why = "has no per-model weights over task vectors for level 1 to search"
    return f"{name!r} {why}; level 1 searches: {known}"


@dataclass(frozen=True)
class Block:
    """One parameter's coordinates in the vector: one per model and layer group, or a single one (a global
    parameter, the method)."""

    name: str
    per_model: bool
    bounds: tuple[Bounds, ...]  # one per model, or the single coordinate's

    def size(self, n_groups: int) -> int:
        return len(self.bounds) * n_groups if self.per_model else 1


class SearchSpace(ConfigModel):
    """What the level-1 search may vary, as declared under ``search_space:`` in a run config."""

    models: list[str] = Field(min_length=1, description="expert model refs (paths or zoo names)")
    base_model: str
    weight_bounds: Bounds | list[Bounds] = (0.0, 1.0)
    density_bounds: Bounds | list[Bounds] = (0.1, 1.0)
    density: float | None = Field(None, description="fixed density for every model: densities not searched")
    dare: bool = True
    rescale_mode: Literal["l1", "inverse"] = "l1"
    fisher: bool = False
    df_merge: bool = Field(False, description="DF-Merge formula (needs fisher, no densities, no DARE)")
    normalize: bool | None = None
    layer_granularity: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)
    seed: int = 0
    methods: list[str] | None = Field(
        None, description="merge methods the search chooses among, a categorical dimension (module docstring); "
        "None: the one method dare / df_merge name"
    )
    mask_rng: Literal["mt19937", "sfc64"] | None = Field(
        None, description="the drop-mask generator its recipes name (recipe key mask_rng); None: they name none, "
        "which merges with mt19937"
    )
    tokenizer_source: Literal["base"] | None = Field(
        None, description="merge experts whose vocabularies differ over the base model's tokenizer, as mergekit's "
        "tokenizer_source: base (recipe key tokenizer_source); None: the vocabularies must agree"
    )
    param_bounds: dict[str, Bounds] = Field(
        default_factory=dict, description="search ranges of the methods' own parameters (epsilon, gamma, lambda), "
        "replacing the registry's"
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """The dump (what a run store records) leaves out ``methods``, ``mask_rng``, ``tokenizer_source`` and
        ``param_bounds`` while unset, so a space that does not use them is stored as before they existed and older runs resume unchanged."""
        data = handler(self)
        if self.methods is None:
            data.pop("methods", None)
        if self.mask_rng is None:
            data.pop("mask_rng", None)
        if self.tokenizer_source is None:
            data.pop("tokenizer_source", None)
        if not self.param_bounds:
            data.pop("param_bounds", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _base_for_methods(cls, data: Any) -> Any:
        methods = data.get("methods") if isinstance(data, Mapping) else None
        if isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods) \
                and not data.get("base_model"):
            raise ValueError(f"base_model is missing: {', '.join(methods)} merge task vectors over a base model; "
                             "name it (a model of 'models' in the run config, not one of search_space.models)")
        return data

    @model_validator(mode="after")
    def _validate(self) -> SearchSpace:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a model twice: {self.models}")
        if self.base_model in self.models:
            raise ValueError(f"base_model {self.base_model!r} is also listed under models")
        for field, limits in (("weight_bounds", (-10.0, 10.0)), ("density_bounds", (0.0, 1.0))):
            value = getattr(self, field)
            if isinstance(value, list):
                if len(value) != len(self.models):
                    raise ValueError(
                        f"{field} has {len(value)} entries but there are {len(self.models)} models"
                    )
                for model, b in zip(self.models, value, strict=True):
                    _check_bounds(f"{field} of {model!r}", b, *limits)
            else:
                _check_bounds(field, value, *limits)
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {self.density}")
        if self.layer_granularity is not None:
            if self.num_layers is None:
                raise ValueError("layer_granularity needs num_layers (the base model's layer count)")
            if self.num_layers % self.layer_granularity:
                raise ValueError(
                    f"layer_granularity {self.layer_granularity} does not divide num_layers {self.num_layers}"
                )
        if self.df_merge and (not self.fisher or self.dare):
            raise ValueError("df_merge needs fisher: true and dare: false (DF-Merge has no drop step)")
        if self.methods is not None:
            self._validate_methods(self.methods)
        self._validate_param_bounds()
        return self

    def _validate_methods(self, methods: list[str]) -> None:
        if not methods:
            raise ValueError(f"methods is empty: list one or more of {', '.join(searchable_methods())}")
        twice = sorted({m for m in methods if methods.count(m) > 1})
        if twice:
            raise ValueError(f"methods lists {', '.join(map(repr, twice))} twice")
        for name in methods:
            problem = _unsearchable(name)
            if problem:
                raise ValueError(f"methods: {problem}")
        if self.fisher or self.df_merge:
            raise ValueError("methods cannot be combined with fisher / df_merge: a Fisher-weighted search runs one "
                             "method (leave methods out and choose it with dare / df_merge)")
        if not self.dare:
            raise ValueError("dare: false has no meaning with methods (dare picks dare_ties or ties when methods "
                             "is not given): list ties under methods instead")

    def _validate_param_bounds(self) -> None:
        extras = dict(self._extras())
        for name, (lo, hi) in self.param_bounds.items():
            if name not in extras:
                searched = ", ".join(extras) or "only weights and densities (weight_bounds, density_bounds)"
                raise ValueError(f"param_bounds.{name}: no searched method ({', '.join(self.method_names)}) has a "
                                 f"parameter {name!r} to search; they search {searched}")
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"param_bounds.{name} [{lo}, {hi}] must be finite")
            if lo > hi:
                raise ValueError(f"param_bounds.{name} [{lo}, {hi}] is reversed: the lower bound exceeds the upper")
            spec = self._spec(name)
            for end in (lo, hi):
                problem = spec.check(end)
                if problem:
                    raise ValueError(f"param_bounds.{name} [{lo}, {hi}]: {name} {problem}")
        for name in extras:
            if name not in self.param_bounds and self._spec(name).search_bounds is None:
                raise ValueError(f"{name} has no default search range: set param_bounds.{name}")

    # --- methods ----------------------------------------------------------------------------------

    @property
    def method_names(self) -> tuple[str, ...]:
        """The methods a point may name: ``methods``, or the one ``dare`` / ``df_merge`` choose."""
        if self.methods is not None:
            return tuple(self.methods)
        if self.df_merge:
            return ("df_merge",)
        return ("dare_ties" if self.dare else "ties",)

    @property
    def merge_method(self) -> str:
        """The method of every point of a single-method space (a space of several: :meth:`method_of`)."""
        if len(self.method_names) > 1:
            raise ConfigError(f"this search space searches {len(self.method_names)} methods "
                              f"({', '.join(self.method_names)}): a point's method is method_of(x)")
        return self.method_names[0]

    def _method(self, name: str) -> MergeMethod:
        return MERGE_METHODS[name]

    def _searched(self, name: str) -> tuple[str, ...]:
        """What a point of method ``name`` varies besides the weights: the registry's list for a listed
        method; without ``methods``, the densities of DARE-TIES / TIES and nothing for DF-Merge, fixed here
        so that such spaces keep their layout whatever the registry adds."""
        if self.methods is None:
            return () if self.df_merge else ("density",)
        return self._method(name).searched or ()

    def _extras(self) -> list[tuple[str, bool]]:
        """The listed methods' searched parameters besides weight and density, each once, in the order the
        methods list them, with whether it is a per-model parameter."""
        out: dict[str, bool] = {}
        for name in self.method_names:
            method = self._method(name)
            for param in self._searched(name):
                if param != "density" and param not in out:
                    out[param] = method.model_param(param) is not None
        return list(out.items())

    def _spec(self, param: str) -> ParamSpec:
        """The registry's spec of a searched parameter (the first listed method that has it)."""
        for name in self.method_names:
            method = self._method(name)
            spec = method.model_param(param) or method.param(param)
            if spec is not None:
                return spec
        raise KeyError(param)

    def _extra_bounds(self, param: str) -> Bounds:
        bounds = self.param_bounds.get(param) or self._spec(param).search_bounds
        assert bounds is not None  # _validate_param_bounds
        return (float(bounds[0]), float(bounds[1]))

    def _takes_rescale_mode(self, method: str) -> bool:
        """Whether ``rescale_mode`` reaches a recipe of ``method``: a random drop's (DARE, DELLA) rescale."""
        if self.methods is None:
            return self.dare
        spec = self._method(method)
        return spec.uses_randomness and spec.param("rescale_mode") is not None

    # --- shape ------------------------------------------------------------------------------------

    @property
    def n_groups(self) -> int:
        """Layer groups per model (1 without ``layer_granularity``)."""
        if self.layer_granularity is None:
            return 1
        assert self.num_layers is not None
        return self.num_layers // self.layer_granularity

    @property
    def searches_density(self) -> bool:
        if self.df_merge or self.density is not None:
            return False
        return any("density" in self._searched(m) for m in self.method_names)

    def blocks(self) -> list[Block]:
        """The vector's coordinates, parameter by parameter, in order (module docstring)."""
        out = [Block("weight", True, tuple(self._model_bounds("weight_bounds")))]
        if self.searches_density:
            out.append(Block("density", True, tuple(self._model_bounds("density_bounds"))))
        for param, per_model in self._extras():
            bounds = self._extra_bounds(param)
            out.append(Block(param, per_model, (bounds,) * len(self.models) if per_model else (bounds,)))
        if len(self.method_names) > 1:
            out.append(Block(METHOD, False, ((0.0, 1.0),)))
        return out

    @property
    def dim(self) -> int:
        return sum(b.size(self.n_groups) for b in self.blocks())

    def param_names(self) -> list[str]:
        """Human-readable name of each coordinate, e.g. ``weight[math][g1]``, ``lambda``, ``method``."""
        names = []
        for b in self.blocks():
            if b.per_model:
                names += [f"{b.name}[{m}][g{g}]" for m in self.models for g in range(self.n_groups)]
            else:
                names.append(b.name)
        return names

    def _model_bounds(self, field: str) -> list[Bounds]:
        value = getattr(self, field)
        return list(value) if isinstance(value, list) else [value] * len(self.models)

    @property
    def holds_simplex(self) -> bool:
        """Whether every weight vector on the simplex lies inside the weight bounds (each holds [0, 1]):
        then λ-weighted merges (HM3's ``coefficients = λ``) are points of this space."""
        return all(lo <= 0.0 and hi >= 1.0 for lo, hi in self._model_bounds("weight_bounds"))

    @property
    def bounds(self) -> torch.Tensor:
        """Physical ``[lower; upper]`` of each coordinate, shape ``2 × dim`` (float64)."""
        pairs = [bd for b in self.blocks() for bd in b.bounds for _ in range(self.n_groups if b.per_model else 1)]
        return torch.tensor(pairs, dtype=torch.float64).T.contiguous()

    # --- vector <-> values -----------------------------------------------------------------------

    def _check_unit(self, x: torch.Tensor | Sequence[float]) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        if x.numel() != self.dim:
            raise ConfigError(f"search point has {x.numel()} coordinates; this search space has {self.dim}")
        bad = (~torch.isfinite(x)) | (x < -UNIT_TOLERANCE) | (x > 1 + UNIT_TOLERANCE)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ConfigError(
                f"search point coordinate {self.param_names()[i]} = {x[i].item()} is outside [0, 1]"
            )
        return x.clamp(0.0, 1.0)

    def _method_bin(self, u: float) -> str:
        """The method of method coordinate ``u``: equal bins in the listed order, u = 1 in the last."""
        names = self.method_names
        return names[min(int(u * len(names)), len(names) - 1)]

    def _physical(self, x: torch.Tensor | Sequence[float]) -> dict[str, Any]:
        """Every block's physical values (per-model blocks as [[per group] per model], others a float)."""
        lo, hi = self.bounds
        values = lo + self._check_unit(x) * (hi - lo)
        n, g = len(self.models), self.n_groups
        out: dict[str, Any] = {}
        i = 0
        for b in self.blocks():
            size = b.size(g)
            chunk = values[i : i + size]
            out[b.name] = chunk.reshape(n, g).tolist() if b.per_model else float(chunk[0])
            i += size
        return out

    def method_of(self, x: torch.Tensor | Sequence[float]) -> str:
        """The merge method of unit-cube point ``x``."""
        if len(self.method_names) == 1:
            self._check_unit(x)
            return self.method_names[0]
        return self._method_bin(float(self._check_unit(x)[-1]))

    def decode(self, x: torch.Tensor | Sequence[float]) -> dict[str, Any]:
        """The physical values a unit-cube point's recipe holds: ``{"weight": [[per group] per model],
        "density": …}`` and the point's method's own parameters (per-model ones nested the same way,
        global ones a number; della's epsilon already fitted to the density). A space that lists
        several methods leaves out the parameters of the methods the point does not pick
        (:meth:`method_of` names it)."""
        physical = self._physical(x)
        method = self.method_of(x)
        searched = self._searched(method)
        out = {"weight": physical["weight"]}
        if "density" in physical and "density" in searched:
            out["density"] = physical["density"]
        for param in searched:
            if param != "density":
                out[param] = physical[param]
        if "epsilon" in out:
            out["epsilon"] = self._fitted_epsilon(out["epsilon"], out.get("density"))
        return out

    def _densities_of(self, densities: list[list[float]] | None) -> list[list[float]]:
        """Each model's density per group: the searched ones, else the fixed ``density`` (else 1, the default)."""
        if densities is not None:
            return densities
        fixed = self.density if self.density is not None else 1.0
        return [[fixed] * self.n_groups for _ in self.models]

    def _fitted_epsilon(self, searched: list[list[float]], densities: list[list[float]] | None) -> list[list[float]]:
        upper = self._extra_bounds("epsilon")[1]
        return [[della_epsilon(e, d, upper) for e, d in zip(eps_row, d_row, strict=True)]
                for eps_row, d_row in zip(searched, self._densities_of(densities), strict=True)]

    def _searched_epsilon(self, fitted: list[list[float]], densities: list[list[float]] | None) -> list[list[float]]:
        """Inverse of :meth:`_fitted_epsilon` (a density that leaves no room: the middle of the bounds,
        since della ignores ε there)."""
        lo, hi = self._extra_bounds("epsilon")
        out = []
        for model, eps_row, d_row in zip(self.models, fitted, self._densities_of(densities), strict=True):
            row = []
            for e, d in zip(eps_row, d_row, strict=True):
                scale = _epsilon_scale(d, hi)
                if scale <= 0:
                    row.append((lo + hi) / 2)
                    continue
                problem = della_problem(d, e)
                if problem:
                    raise ConfigError(f"recipe model {model!r}: {problem}")
                row.append(e / scale)
            out.append(row)
        return out

    def encode(
        self,
        weights: Sequence[Sequence[float]],
        densities: Sequence[Sequence[float]] | None,
        *,
        extras: Mapping[str, Any] | None = None,
        method: str | None = None,
    ) -> torch.Tensor:
        """Inverse of the bounds' map; values outside the bounds are refused, naming the coordinate.

        ``extras`` holds the methods' own searched parameters by name (per-model ones nested as the
        weights, global ones a number, epsilon as searched, not fitted to the density): one not given
        takes the middle of its bounds, as a point's inactive coordinates do. ``method``: the point's
        method in a space of several (default the first listed), encoded as the middle of its bin.
        """
        flat = [v for row in weights for v in row]
        if self.searches_density:
            if densities is None:
                raise ConfigError("this search space searches densities but none were given")
            flat += [v for row in densities for v in row]
        expected = len(self.models) * self.n_groups * (2 if self.searches_density else 1)
        if len(flat) != expected:
            what = "" if expected == self.dim else " weights and densities"
            raise ConfigError(f"got {len(flat)} coefficient values; this search space has {expected}{what}")
        extras = dict(extras or {})
        for b in self.blocks()[2 if self.searches_density else 1 :]:
            if b.name == METHOD:
                chosen = method if method is not None else self.method_names[0]
                if chosen not in self.method_names:
                    raise ConfigError(f"method {chosen!r} is not one of this space's ({', '.join(self.method_names)})")
                flat.append((self.method_names.index(chosen) + 0.5) / len(self.method_names))
            elif b.name not in extras:
                flat += [(lo + hi) / 2 for lo, hi in b.bounds for _ in range(self.n_groups if b.per_model else 1)]
            elif b.per_model:
                flat += [float(v) for row in extras.pop(b.name) for v in row]
            else:
                flat.append(float(extras.pop(b.name)))
        unknown = sorted(set(extras) - {b.name for b in self.blocks()})
        if unknown:
            raise ConfigError(f"this search space has no parameter {', '.join(map(repr, unknown))} to search")
        if len(flat) != self.dim:
            raise ConfigError(f"got {len(flat)} values in all; this search space has {self.dim} coordinates")
        v = torch.tensor(flat, dtype=torch.float64)
        lo, hi = self.bounds
        outside = (v < lo - UNIT_TOLERANCE) | (v > hi + UNIT_TOLERANCE)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise ConfigError(
                f"{self.param_names()[i]} = {v[i].item()} lies outside its bounds "
                f"[{lo[i].item()}, {hi[i].item()}]"
            )
        span = hi - lo
        return torch.where(span > 0, (v - lo) / torch.where(span > 0, span, 1.0), 0.0).clamp(0.0, 1.0)

    # --- recipes ---------------------------------------------------------------------------------

    def _setting(self, per_group: list[float]) -> float | list[dict[str, Any]]:
        if self.layer_granularity is None:
            return per_group[0]
        assert self.num_layers is not None
        groups = layer_group_filters(self.num_layers, self.layer_granularity)
        conds: list[dict[str, Any]] = [
            {"filter": f, "value": value}
            for filters, value in zip(groups, per_group, strict=True)
            for f in filters
        ]
        return conds + [{"value": per_group[0]}]  # tensors outside the layers

    def to_recipe(self, x: torch.Tensor | Sequence[float], fisher_paths: Sequence[str] | None = None) -> dict:
        """The hm3 recipe (mergekit schema) of unit-cube point ``x``: its method's name and parameters.

        ``fisher_paths`` (one safetensors file per model, computed by the driver for the
        decoded coefficients) is required exactly when the space has ``fisher: true``.
        """
        values = self.decode(x)
        method = self.method_of(x)
        spec = self._method(method)
        if self.fisher and (fisher_paths is None or len(fisher_paths) != len(self.models)):
            got = "none" if fisher_paths is None else len(fisher_paths)
            raise ConfigError(f"fisher: true needs one Fisher file per model ({len(self.models)}), got {got}")
        if not self.fisher and fisher_paths is not None:
            raise ConfigError("Fisher files given but the search space has fisher: false")
        per_model = [p for p in self._searched(method) if p != "density" and spec.model_param(p) is not None]
        models = []
        for i, model in enumerate(self.models):
            params: dict[str, Any] = {"weight": self._setting(values["weight"][i])}
            if "density" in values:
                params["density"] = self._setting(values["density"][i])
            elif self.density is not None and spec.model_param("density") is not None:
                params["density"] = self.density
            for param in per_model:
                params[param] = self._setting(values[param][i])
            if fisher_paths is not None:
                params["fisher"] = str(fisher_paths[i])
            models.append({"model": model, "parameters": params})
        global_params: dict[str, Any] = {}
        if self.normalize is not None and not self.df_merge:
            global_params["normalize"] = self.normalize
        if self._takes_rescale_mode(method) and self.rescale_mode != "l1":
            global_params["rescale_mode"] = self.rescale_mode  # l1 is mergekit's default: keep the recipe exportable
        for param in self._searched(method):
            if param != "density" and param not in per_model:
                global_params[param] = values[param]
        recipe: dict[str, Any] = {
            "merge_method": method,
            "base_model": self.base_model,
            "models": models,
        }
        if global_params:
            recipe["parameters"] = global_params
        recipe["seed"] = self.seed
        if self.mask_rng is not None:
            recipe["mask_rng"] = self.mask_rng
        if self.tokenizer_source is not None:
            recipe["tokenizer_source"] = self.tokenizer_source
        return recipe

    def _read_setting(self, setting: Any, where: str) -> list[float]:
        """Per-group values of one recipe setting (scalar or this space's filter list)."""
        if isinstance(setting, (int, float)) and not isinstance(setting, bool):
            return [float(setting)] * self.n_groups
        if not isinstance(setting, list) or self.layer_granularity is None:
            raise ConfigError(f"{where}: expected a number for this search space, got {setting!r}")
        assert self.num_layers is not None
        by_filter = {c.get("filter"): c.get("value") for c in setting if isinstance(c, Mapping)}
        out = []
        for filters in layer_group_filters(self.num_layers, self.layer_granularity):
            vals = {by_filter.get(f, by_filter.get(None)) for f in filters}
            if len(vals) != 1 or None in vals:
                raise ConfigError(
                    f"{where}: layers {filters[0]}…{filters[-1]} do not share one value ({sorted(map(str, vals))}); "
                    f"the recipe does not fit layer_granularity {self.layer_granularity}"
                )
            out.append(float(vals.pop()))
        return out

    def from_recipe(self, recipe: Mapping[str, Any] | Any) -> torch.Tensor:
        """Unit-cube point of a recipe this space produced (to re-merge or re-seed front points).

        In a space of several methods, the coordinates the recipe's method ignores take the middle of
        their bounds, so ``to_recipe(from_recipe(r)) == r`` while the point itself is one of many.
        """
        if hasattr(recipe, "model_dump"):
            recipe = recipe.model_dump(exclude_none=True, mode="json")
        method = recipe.get("merge_method")
        if method not in self.method_names:
            if len(self.method_names) == 1:
                raise ConfigError(f"recipe merge_method {method!r} is not this space's {self.method_names[0]!r}")
            raise ConfigError(f"recipe merge_method {method!r} is not one of this space's methods "
                              f"({', '.join(self.method_names)})")
        if recipe.get("base_model") != self.base_model:
            raise ConfigError(f"recipe base_model {recipe.get('base_model')!r} is not {self.base_model!r}")
        entries = recipe.get("models") or []
        names = [e.get("model") for e in entries]
        if names != self.models:
            raise ConfigError(f"recipe models {names} differ from the search space's {self.models}")
        searched = self._searched(method)
        reads_density = self.searches_density and "density" in searched
        spec = self._method(method)
        weights, densities = [], []
        per_model: dict[str, list[list[float]]] = {}
        for e in entries:
            params = e.get("parameters") or {}
            if "weight" not in params:
                raise ConfigError(f"recipe model {e['model']!r} has no weight")
            weights.append(self._read_setting(params["weight"], f"models[{e['model']}].weight"))
            if reads_density:
                if "density" not in params:
                    raise ConfigError(f"recipe model {e['model']!r} has no density")
                densities.append(self._read_setting(params["density"], f"models[{e['model']}].density"))
            for param in searched:
                if param != "density" and spec.model_param(param) is not None:
                    if param not in params:
                        raise ConfigError(f"recipe model {e['model']!r} has no {param}")
                    per_model.setdefault(param, []).append(
                        self._read_setting(params[param], f"models[{e['model']}].{param}"))
        extras: dict[str, Any] = dict(per_model)
        global_params = recipe.get("parameters") or {}
        for param in searched:
            if param != "density" and param not in per_model:
                value = global_params.get(param)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"recipe parameters.{param}: expected a number for this search space, "
                                      f"got {value!r}")
                extras[param] = float(value)
        if "epsilon" in extras:
            extras["epsilon"] = self._searched_epsilon(extras["epsilon"], densities if reads_density else None)
        if len(self.method_names) == 1 and self.methods is None:
            return self.encode(weights, densities if self.searches_density else None)
        if self.searches_density and not reads_density:  # the method has no density: its coordinates are inactive
            densities = [[(lo + hi) / 2] * self.n_groups for lo, hi in self._model_bounds("density_bounds")]
        return self.encode(weights, densities if self.searches_density else None, extras=extras, method=method)

    def fixed_coefficients(self, lam: Sequence[float], density: float | None = None) -> torch.Tensor:
        """Unit-cube point with weights = λ (HM3's parameter stage: no search).

        Densities, when searched, are set to ``density``, else the middle of their bounds
        (HM3 does not state its DARE/TIES density; the midpoint is a neutral choice). In a space
        that lists methods, the methods' own parameters take the middle of their bounds too, and the
        method is the first listed.
        """
        lam = [float(v) for v in lam]
        if len(lam) != len(self.models):
            raise ConfigError(f"λ has {len(lam)} entries; expected one per model ({len(self.models)})")
        weights = [[v] * self.n_groups for v in lam]
        densities = None
        if self.searches_density:
            mids = [(lo + hi) / 2 for lo, hi in self._model_bounds("density_bounds")]
            densities = [[density if density is not None else mid] * self.n_groups for mid in mids]
        return self.encode(weights, densities)


def parse_search_space(data: Any, *, source: str = "<config>") -> SearchSpace:
    """Validate a parsed ``search_space:`` mapping; every problem becomes a ConfigError naming it."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: search_space must be a mapping, got {type(data).__name__}")
    try:
        return SearchSpace.model_validate(dict(data))
    except ValidationError as err:
        raise invalid_config(err, source, "search_space") from None
