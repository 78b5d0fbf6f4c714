"""Merge recipes: mergekit's YAML schema plus hm3's documented additions.

A user's existing mergekit config for ``linear``, ``task_arithmetic``, ``ties``,
``dare_linear`` or ``dare_ties`` loads unchanged and means the same thing. hm3's
additions are extra keys (see ``docs/RECIPES.md``):

* top-level ``seed`` — seeds DARE's random drop masks (mergekit uses torch's
  global RNG, so its DARE merges are not reproducible);
* global parameter ``rescale_mode`` — ``l1`` (mergekit's: keep the L1 norm),
  ``inverse`` (the DARE paper's 1/density) or ``none``;
* per-model parameter ``fisher`` — path to a safetensors file of diagonal
  Fisher tensors (same names as the model's) that turns ``ties``,
  ``dare_ties``, ``task_arithmetic`` into their Fisher-weighted variants;
* merge methods ``fisher`` and ``df_merge``.

The models are frozen pydantic objects: a recipe is data, hashed and stored by
the run store, never mutated by the planner.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from hm3.errors import ConfigError, invalid_config

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConditionalParameter(_Frozen):
    """A parameter value that applies only to tensors whose name contains ``filter``."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient


class InputModel(_Frozen):
    """One entry of ``models:``."""

    model: str
    parameters: dict[str, ParameterSetting] | None = None


class MergeConfig(_Frozen):
    """A merge recipe (mergekit's ``MergeConfiguration`` subset that hm3 executes)."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel]
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int | None = None

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, v: list[InputModel]) -> list[InputModel]:
        if not v:
            raise ValueError("'models' must list at least one model")
        return v

    def model_paths(self) -> list[str]:
        """Every referenced model, base first, without duplicates."""
        out: list[str] = []
        for m in ([self.base_model] if self.base_model else []) + [m.model for m in self.models]:
            if m not in out:
                out.append(m)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


def parse_merge_config(data: Any, *, source: str = "<config>") -> MergeConfig:
    """Validate a parsed YAML/JSON mapping into a :class:`MergeConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a mapping, got {type(data).__name__}")
    for key in ("slices", "modules"):
        if key in data:
            raise ConfigError(
                f"{source}: '{key}' configs (layer slicing/passthrough) are not supported by 'hm3 merge' yet; "
                "use 'models:'"
            )
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as err:
        raise invalid_config(err, source, "merge config") from None
    _check_numbers(cfg, source)
    return cfg


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read a recipe file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_merge_config(data, source=str(p))


def _iter_numbers(setting: Any):
    if isinstance(setting, ConditionalParameter):
        yield from _iter_numbers(setting.value)
    elif isinstance(setting, list):
        for s in setting:
            yield from _iter_numbers(s)
    elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
        yield float(setting)


def _check_numbers(cfg: MergeConfig, source: str) -> None:
    """Refuse NaN/Inf anywhere; range checks that depend on the method live in the registry."""
    settings: list[tuple[str, Any]] = [(f"parameters.{k}", v) for k, v in (cfg.parameters or {}).items()]
    for i, m in enumerate(cfg.models):
        settings += [(f"models[{i}] ({m.model}).parameters.{k}", v) for k, v in (m.parameters or {}).items()]
    for where, setting in settings:
        for x in _iter_numbers(setting):
            if not math.isfinite(x):
                raise ConfigError(f"{source}: {where} must be a finite number, got {x}")
