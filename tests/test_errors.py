"""The one formatter of config validation errors: ``key.path: problem`` lines under ``SOURCE: invalid WHAT``."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator

from hm3.errors import ConfigError, invalid_config


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int
    rate: Annotated[float, AfterValidator(abs)] | list[float] = 0.1

    @field_validator("steps")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"steps must be >= 1, got {v}")
        return v


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner
    name: str


def _error(data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Outer.model_validate(data)
    return caught.value


def test_each_problem_is_one_line_naming_its_key():
    err = invalid_config(_error({"inner": {"steps": 0, "colour": 1}, "name": 3}), "run.yml", "run config",
                         prefix="level2.")
    assert isinstance(err, ConfigError)
    assert str(err).splitlines() == [
        "run.yml: invalid run config:",
        "  level2.inner.steps: steps must be >= 1, got 0",
        "  level2.inner.colour: unknown key",
        "  level2.name: Input should be a valid string (got 3)",
    ]


def test_missing_keys_and_locations_without_pydantic_validator_steps():
    text = str(invalid_config(_error({"inner": {"rate": "fast"}}), "<config>", "config"))
    assert "  inner.steps: required key is missing" in text and "  name: required key is missing" in text
    assert "  inner.rate: Input should be a valid number" in text  # not inner.rate.function-after[abs(), float]
    assert "function-after" not in text


def test_many_problems_are_cut_with_a_count():
    text = str(invalid_config(_error({"inner": {"steps": "x", **{f"k{i}": 1 for i in range(9)}}}), "s", "w"))
    assert text.splitlines()[-1] == "  ... and 3 more" and len(text.splitlines()) == 10


def test_a_whole_section_of_the_wrong_type_is_named_by_the_prefix():
    with pytest.raises(ValidationError) as caught:
        Inner.model_validate(5)
    text = str(invalid_config(caught.value, "run.yml", "run config", prefix="level2."))
    assert text.splitlines()[1].startswith("  level2: Input should be a valid dictionary"), text
