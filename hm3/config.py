"""Merge recipes: mergekit's YAML schema plus hm3's documented additions.

A user's existing mergekit config for ``linear``, ``task_arithmetic``, ``ties``,
``dare_linear`` or ``dare_ties`` (and the other methods both tools have) loads
unchanged and means the same thing, whether it merges whole models (``models:``)
or layer ranges (``slices:``, e.g. passthrough frankenmerges). hm3's
additions are extra keys (see ``docs/RECIPES.md``):

* top-level ``seed`` — seeds DARE's random drop masks (mergekit uses torch's
  global RNG, so its DARE merges are not reproducible);
* top-level ``mask_rng`` — the generator of those masks: ``mt19937`` (torch's, what
  a recipe without the key gets, so stored recipes keep their tensors) or
  ``sfc64`` (numpy's SFC64, about twice as fast to draw);
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError, field_validator, model_validator

from hm3.config_model import ConfigModel
from hm3.errors import ConfigError, invalid_config

#: DARE/DELLA drop-mask generators a recipe may name (:func:`hm3.merge.plan.mask_generator`).
MASK_RNGS: tuple[str, ...] = ("mt19937", "sfc64")
MaskRng = Literal["mt19937", "sfc64"]

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]


class ConditionalParameter(ConfigModel):
    """A parameter value that applies only to tensors whose name contains ``filter``."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient


class InputModel(ConfigModel):
    """One entry of ``models:``."""

    model: str
    parameters: dict[str, ParameterSetting] | None = None


class InputSlice(ConfigModel):
    """One source of a slice: layers ``[start, end)`` of ``model`` (mergekit's ``InputSliceDefinition``)."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None

    @field_validator("layer_range")
    @classmethod
    def _range_ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        start, end = v
        if start < 0 or end < start:
            raise ValueError(f"[{start}, {end}] is not a layer range: it needs 0 <= start <= end")
        return v

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(ConfigModel):
    """One entry of ``slices:``: consecutive output layers merged from equally long ranges of its sources.

    ``base_model`` and ``parameters`` here win over the recipe's for this slice, as in mergekit.
    """

    sources: list[InputSlice]
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] | None = None

    @field_validator("sources")
    @classmethod
    def _sources_not_empty(cls, v: list[InputSlice]) -> list[InputSlice]:
        if not v:
            raise ValueError("a slice must list at least one source")
        return v


class ModelTokenSource(ConfigModel):
    """A token's row taken from one row of a model's own embedding: by id, or by the token it has there."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _id_or_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source gives exactly one of 'token_id' and 'token'")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {self.token_id}")
        return self


class ZeroTokenSource(ConfigModel):
    """A token's row of zeros."""

    kind: Literal["zero"]


class TokenSetting(ConfigModel):
    """One entry of ``tokenizer.tokens``: where the token's row comes from in a model that lacks it (every
    model with ``force``). ``source`` is a model (its row for the token), a model's row, or zeros."""

    source: ModelTokenSource | ZeroTokenSource | str | None = None
    force: bool = False


class TokenizerSettings(ConfigModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary (``source``), tokens added to it or whose rows
    are chosen (``tokens``), and a row count rounded up to a multiple (``pad_to_multiple_of``)."""

    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a whole number >= 1, got {v}")
        return v


class MergeConfig(ConfigModel):
    """A merge recipe (mergekit's ``MergeConfiguration`` subset that hm3 executes).

    Exactly one of ``models`` (whole models merged tensor by tensor) and ``slices`` (an output
    stacked from layer ranges, each slice merged on its own) is given.
    """

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    seed: int | None = None
    mask_rng: MaskRng | None = None  # None: mt19937, the draw of recipes written before the key existed

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, v: list[InputModel] | None) -> list[InputModel] | None:
        if v is not None and not v:
            raise ValueError("'models' must list at least one model")
        return v

    @field_validator("slices")
    @classmethod
    def _slices_not_empty(cls, v: list[OutputSlice] | None) -> list[OutputSlice] | None:
        if v is not None and not v:
            raise ValueError("'slices' must list at least one slice")
        return v

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("a merge config lists either 'models' or 'slices'" + (
                ", not both" if self.models is not None else ""))
        return self

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> MergeConfig:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    @property
    def vocabulary_source(self) -> str | None:
        """The output vocabulary's source, whichever key gives it: 'base', 'union', a model, or None (the
        models' tensors are merged row for row, as they are)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def model_paths(self) -> list[str]:
        """Every referenced model, base first, without duplicates."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models or ()]
        for s in self.slices or ():
            refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


def parse_merge_config(data: Any, *, source: str = "<config>") -> MergeConfig:
    """Validate a parsed YAML/JSON mapping into a :class:`MergeConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a mapping, got {type(data).__name__}")
    if "modules" in data:
        raise ConfigError(
            f"{source}: 'modules' configs (multi-module models) are not supported by 'hm3 merge'; "
            "use 'models:' or 'slices:'"
        )
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as err:
        raise invalid_config(err, source, "merge config") from None
    _check_numbers(cfg, source)
    return cfg


def read_yaml_file(path: str | Path, *, what: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """The YAML in a config file (a recipe, a run config), read with a safe ``loader``; a missing file, a
    folder, bad YAML and text that is not UTF-8 are refused naming the file (``what``: "run config", ...)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: a folder, not a config file" if p.is_dir() else f"{what} not found: {p}")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:  # a binary or UTF-16 file: YAML configs are UTF-8 text
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start}): a config is a UTF-8 YAML file") from None


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read a recipe file; errors name the file."""
    return parse_merge_config(read_yaml_file(path, what="config file"), source=str(Path(path)))


@contextmanager
def naming(source: str | None) -> Iterator[None]:
    """A :class:`ConfigError` raised inside names ``source`` (the recipe file) first: checks against the
    models (parameters per tensor, dtypes, model counts) find problems after the file was read."""
    try:
        yield
    except ConfigError as err:
        if source is None or str(err).startswith(f"{source}:"):
            raise
        raise ConfigError(f"{source}: {err}") from None


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
    for where, params in parameter_places(cfg)[1:]:
        settings += [(f"{where}.{k}", v) for k, v in params.items()]
    for where, setting in settings:
        for x in _iter_numbers(setting):
            if not math.isfinite(x):
                raise ConfigError(f"{source}: {where} must be a finite number, got {x}")


def parameter_places(cfg: MergeConfig) -> list[tuple[str, dict[str, ParameterSetting]]]:
    """Every ``parameters`` mapping of a recipe with where it sits, the global one first."""
    places = [("parameters", cfg.parameters or {})]
    places += [
        (f"models[{i}] ({m.model}).parameters", m.parameters or {}) for i, m in enumerate(cfg.models or ())
    ]
    for i, s in enumerate(cfg.slices or ()):
        places.append((f"slices[{i}].parameters", s.parameters or {}))
        places += [
            (f"slices[{i}].sources[{j}] ({src.model}).parameters", src.parameters or {})
            for j, src in enumerate(s.sources)
        ]
    return places
