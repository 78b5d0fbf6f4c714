"""The level-1 search space: a point of the unit cube <-> an hm3 merge recipe.

Every optimiser works in ``[0, 1]^d`` (GPs, Sobol designs and NSGA-II all assume a
box, and a unit box needs no per-optimiser scaling); :meth:`SearchSpace.to_recipe`
is the only place that maps a unit-cube point to physical weights and densities
inside the configured bounds. The recipe is a plain dict in mergekit's schema
(``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``seed``), so a front point can be stored, re-merged by ``hm3 merge`` and, when no
hm3-only key is used, run unchanged by ``mergekit-yaml``.

Vector layout (see :meth:`SearchSpace.param_names`): all weights first, then all
densities (when searched), each ordered model-major then layer group.

Per-layer-group values (``layer_granularity = g``, as mergekit-evolve's option)
are written as mergekit ``filter`` conditions: one ``{filter: "layers.{i}.", value}``
per layer ``i`` (mergekit matches filters as substrings, and the trailing dot keeps
``layers.1.`` from matching ``layers.11.``), followed by an unfiltered condition for
the tensors outside the layers (embeddings, final norm, LM head). Those take the
first group's value, which is what mergekit's own depth rule (``t = 0``) gives them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hm3.errors import ConfigError, invalid_config

Bounds = tuple[float, float]
#: Tolerance for unit-cube coordinates produced by floating-point optimisers.
UNIT_TOLERANCE = 1e-9


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
    if lo > hi:
        raise ValueError(f"{name} [{lo}, {hi}] is reversed: the lower bound exceeds the upper")
    if lo < lo_limit or hi > hi_limit:
        raise ValueError(f"{name} [{lo}, {hi}] must lie within [{lo_limit}, {hi_limit}]")


class SearchSpace(BaseModel):
    """What the level-1 search may vary, as declared under ``search_space:`` in a run config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
        return self

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
        return not self.df_merge and self.density is None

    @property
    def merge_method(self) -> str:
        if self.df_merge:
            return "df_merge"
        return "dare_ties" if self.dare else "ties"

    @property
    def dim(self) -> int:
        per_kind = len(self.models) * self.n_groups
        return per_kind * (2 if self.searches_density else 1)

    def param_names(self) -> list[str]:
        """Human-readable name of each coordinate, e.g. ``weight[math][g1]``."""
        kinds = ["weight"] + (["density"] if self.searches_density else [])
        return [f"{k}[{m}][g{g}]" for k in kinds for m in self.models for g in range(self.n_groups)]

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
        fields = ["weight_bounds"] + (["density_bounds"] if self.searches_density else [])
        pairs = [b for f in fields for b in self._model_bounds(f) for _ in range(self.n_groups)]
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

    def decode(self, x: torch.Tensor | Sequence[float]) -> dict[str, list[list[float]]]:
        """Physical values of a unit-cube point: ``{"weight": [[per group] per model], "density": …}``."""
        lo, hi = self.bounds
        values = lo + self._check_unit(x) * (hi - lo)
        n, g = len(self.models), self.n_groups
        out = {"weight": values[: n * g].reshape(n, g).tolist()}
        if self.searches_density:
            out["density"] = values[n * g :].reshape(n, g).tolist()
        return out

    def encode(
        self, weights: Sequence[Sequence[float]], densities: Sequence[Sequence[float]] | None
    ) -> torch.Tensor:
        """Inverse of :meth:`decode`; values outside the bounds are refused, naming the coordinate."""
        flat = [v for row in weights for v in row]
        if self.searches_density:
            if densities is None:
                raise ConfigError("this search space searches densities but none were given")
            flat += [v for row in densities for v in row]
        if len(flat) != self.dim:
            raise ConfigError(f"got {len(flat)} coefficient values; this search space has {self.dim}")
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
        """The hm3 recipe (mergekit schema) of unit-cube point ``x``.

        ``fisher_paths`` (one safetensors file per model, computed by the driver for the
        decoded coefficients) is required exactly when the space has ``fisher: true``.
        """
        values = self.decode(x)
        if self.fisher and (fisher_paths is None or len(fisher_paths) != len(self.models)):
            got = "none" if fisher_paths is None else len(fisher_paths)
            raise ConfigError(f"fisher: true needs one Fisher file per model ({len(self.models)}), got {got}")
        if not self.fisher and fisher_paths is not None:
            raise ConfigError("Fisher files given but the search space has fisher: false")
        models = []
        for i, model in enumerate(self.models):
            params: dict[str, Any] = {"weight": self._setting(values["weight"][i])}
            if self.searches_density:
                params["density"] = self._setting(values["density"][i])
            elif not self.df_merge:
                params["density"] = self.density
            if fisher_paths is not None:
                params["fisher"] = str(fisher_paths[i])
            models.append({"model": model, "parameters": params})
        global_params: dict[str, Any] = {}
        if self.normalize is not None and not self.df_merge:
            global_params["normalize"] = self.normalize
        if self.dare and self.rescale_mode != "l1":  # l1 is mergekit's default: keep the recipe exportable
            global_params["rescale_mode"] = self.rescale_mode
        recipe: dict[str, Any] = {
            "merge_method": self.merge_method,
            "base_model": self.base_model,
            "models": models,
        }
        if global_params:
            recipe["parameters"] = global_params
        recipe["seed"] = self.seed
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
        """Unit-cube point of a recipe this space produced (to re-merge or re-seed front points)."""
        if hasattr(recipe, "model_dump"):
            recipe = recipe.model_dump(exclude_none=True, mode="json")
        if recipe.get("merge_method") != self.merge_method:
            raise ConfigError(
                f"recipe merge_method {recipe.get('merge_method')!r} is not this space's {self.merge_method!r}"
            )
        if recipe.get("base_model") != self.base_model:
            raise ConfigError(f"recipe base_model {recipe.get('base_model')!r} is not {self.base_model!r}")
        entries = recipe.get("models") or []
        names = [e.get("model") for e in entries]
        if names != self.models:
            raise ConfigError(f"recipe models {names} differ from the search space's {self.models}")
        weights, densities = [], []
        for e in entries:
            params = e.get("parameters") or {}
            if "weight" not in params:
                raise ConfigError(f"recipe model {e['model']!r} has no weight")
            weights.append(self._read_setting(params["weight"], f"models[{e['model']}].weight"))
            if self.searches_density:
                if "density" not in params:
                    raise ConfigError(f"recipe model {e['model']!r} has no density")
                densities.append(self._read_setting(params["density"], f"models[{e['model']}].density"))
        return self.encode(weights, densities if self.searches_density else None)

    def fixed_coefficients(self, lam: Sequence[float], density: float | None = None) -> torch.Tensor:
        """Unit-cube point with weights = λ (HM3's parameter stage: no search).

        Densities, when searched, are set to ``density``, else the middle of their bounds
        (HM3 does not state its DARE/TIES density; the midpoint is a neutral choice).
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
