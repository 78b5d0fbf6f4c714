"""The two-level run config (``hm3 run CONFIG.yml RUN_DIR``), and configs as a run store keeps them.

A run store records the config its run was created with; a resume must give the same one, and
readers (``hm3 front``, ``export``, ``request``) parse it back. Stored configs therefore carry a
format version (:data:`CONFIG_FORMAT`)::

    {"format": 3, "level1": {...}}                     # hm3 search param: a level-1 search
    {"format": 3, "level1": {...}, "level2": {...}}    # hm3 run: both levels

Each section is the complete dump of its pydantic model. When a field is added, the stored configs
of older runs lack it: :data:`CONFIG_MIGRATIONS` turns a stored config of format v into format
v + 1 (filling in, e.g., the new field's default), so a resume compares like with like and an older
run reads as a current one. A stored config newer than this hm3 is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from hm3.arch.rl_config import Level2Config
from hm3.config_model import ConfigModel, FiniteConfigModel
from hm3.errors import ConfigError, invalid_config
from hm3.search.preferences import dirichlet_preferences, validate_preferences
from hm3.search.run_config import RunConfig, parse_run_config, read_config_file
from hm3.store import RunStore

#: The format of stored configs written by this hm3 (module docstring).
CONFIG_FORMAT = 3
RunKind = Literal["level1", "two-level"]


class Level2Section(FiniteConfigModel):
    """The ``level2:`` section of a run config."""

    pool: Literal["experts+merge", "experts"] = Field(
        "experts+merge",
        description="experts+merge: HM3 (level-1 merge for λ in the pool); experts: level 2 alone, "
        "no level-1 search, the base model frames the paths",
    )
    preferences: int | list[list[float]] = Field(
        4, description="N preference vectors λ ~ Dirichlet(1) (seeded), or an explicit list"
    )
    keep_best: int = Field(
        0,
        ge=0,
        description="also keep, for each preference λ, the N paths of the whole run (offline and online "
        "episodes) with the best lower bound of Σ λ_k f̂_k from their stored DAR scores, and score them on "
        "the whole validation plan (N × preferences full evaluations at most) [design]. 0 keeps only each "
        "λ's greedy path and best path by raw reward. On SmolLM2 the policy found whole-expert paths offline "
        "that neither rule kept (docs/BENCHMARKS.md, level-2 modes on SmolLM2)",
    )
    swaps: list[tuple[int, int]] = Field(
        [],
        description="layer swaps (k_bottom, k_top) as a prior [design]: for each preference's frame and each "
        "expert as donor, the frame's path with the donor's bottom k_bottom and top k_top layers "
        "(hm3.arch.swaps) joins the paths kept for the final front, scored on the whole validation plan "
        "(preferences × experts × len(swaps) full evaluations at most). [] (default): none",
    )
    rl: Level2Config = Level2Config()


class TwoLevelConfig(ConfigModel):
    level1: RunConfig
    level2: Level2Section

    def canonical(self) -> dict[str, Any]:
        """The config as the run store records it."""
        return stored_form(self.level1, self.level2)

    def preferences(self) -> np.ndarray:
        k = len(self.level1.objectives)
        prefs = self.level2.preferences
        if isinstance(prefs, int):
            if prefs < 1:
                raise ConfigError(f"level2.preferences must be >= 1, got {prefs}")
            return dirichlet_preferences(prefs, k, seed=self.level1.seed + 7919).numpy()
        return validate_preferences(prefs, k).numpy()


def parse_two_level_config(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> TwoLevelConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a run config must be a mapping")
    data = dict(data)
    raw_l2 = data.pop("level2", None)
    if raw_l2 is None:  # no section, or an empty one: every level-2 default
        raw_l2 = {}
    level1 = parse_run_config(data, source=source, base_dir=base_dir)
    try:
        level2 = Level2Section.model_validate(raw_l2)
    except ValidationError as err:
        raise invalid_config(err, source, "run config", prefix="level2.") from None
    cfg = TwoLevelConfig(level1=level1, level2=level2)
    try:
        cfg.preferences()  # wrong-length or non-normalised vectors: refused before anything runs
    except ConfigError as err:
        problem = str(err).removeprefix("level2.preferences ")
        raise ConfigError(f"{source}: invalid run config:\n  level2.preferences: {problem}") from None
    return cfg


def load_two_level_config(path: str | Path) -> TwoLevelConfig:
    return parse_two_level_config(read_config_file(path), source=str(path), base_dir=Path(path).parent)


# --- configs as a run store keeps them -------------------------------------------------------------


def stored_form(level1: RunConfig, level2: Level2Section | None = None) -> dict[str, Any]:
    """The config a run store records: format version, then each level's complete dump."""
    stored: dict[str, Any] = {"format": CONFIG_FORMAT, "level1": level1.canonical()}
    if level2 is not None:
        stored["level2"] = json.loads(level2.model_dump_json())
    return stored


def _from_format_1(stored: dict[str, Any]) -> dict[str, Any]:
    """Format 1: a level-1 search stored its bare config (no version); a two-level run stored
    ``{"format": 1, "level1", "level2"}`` leaving out the level-2 fields added after its first runs
    while they held their defaults."""
    if "level1" not in stored:
        return {"level1": stored}
    level2 = dict(stored.get("level2") or {})
    for key, default in {"keep_best": 0, "swaps": []}.items():
        level2.setdefault(key, default)
    rl = dict(level2.get("rl") or {})
    for key, default in {"path_prior": "none", "prior_kl": 1.0, "critic_margin": None,
                         "transition_scales": None}.items():
        rl.setdefault(key, default)
    level2["rl"] = rl
    return {"level1": stored["level1"], "level2": level2}


def _from_format_2(stored: dict[str, Any]) -> dict[str, Any]:
    """Format 2 had no evaluation device, dtype or vLLM engine settings: its runs evaluated in float32 on
    the CPU, with vLLM's engine defaults."""
    level1 = dict(stored["level1"])
    evaluation = dict(level1.get("evaluation") or {})
    for key, default in {"device": "cpu", "dtype": "float32"}.items():
        evaluation.setdefault(key, default)
    evaluation.setdefault("vllm", {"tensor_parallel_size": 1, "gpu_memory_utilization": None, "max_model_len": None})
    return stored | {"level1": level1 | {"evaluation": evaluation}}


#: CONFIG_MIGRATIONS[v] turns a stored config of format v into one of format v + 1.
CONFIG_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_format_1, 2: _from_format_2}


def stored_format(stored: dict[str, Any]) -> int:
    """The format of a stored config (format 1 level-1 searches carry no version)."""
    version = stored.get("format", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else -1


def migrate_stored_config(stored: dict[str, Any], *, where: str) -> dict[str, Any]:
    """``stored`` (a run store's config) in the current format; one from a newer (or unknown) format
    is refused, naming ``where`` it is."""
    version = stored_format(stored)
    if version > CONFIG_FORMAT or version not in (*CONFIG_MIGRATIONS, CONFIG_FORMAT):
        raise ConfigError(
            f"{where} was written by another hm3 version (run config format {stored.get('format')!r}, this hm3 "
            f"reads formats 1 to {CONFIG_FORMAT}); open it with the version that wrote it, or start a new run"
        )
    config = dict(stored)
    for v in range(version, CONFIG_FORMAT):
        config = CONFIG_MIGRATIONS[v](config)
    return {**config, "format": CONFIG_FORMAT}


@dataclass(frozen=True)
class StoredRun:
    """A run's config as its store records it, parsed: a level-1 search or a two-level run."""

    level1: RunConfig
    level2: Level2Section | None

    @property
    def kind(self) -> RunKind:
        return "level1" if self.level2 is None else "two-level"

    def two_level(self) -> TwoLevelConfig:
        if self.level2 is None:
            raise ConfigError("a level-1 search ('hm3 search param') has no two-level config")
        return TwoLevelConfig(level1=self.level1, level2=self.level2)


def stored_config(store: RunStore) -> dict[str, Any]:
    """The run's recorded config in the current format (not yet parsed)."""
    stored = store.config()
    if not isinstance(stored, dict):
        raise ConfigError(f"run store {store.path} holds no run config: not a run of 'hm3 search param' or 'hm3 run'")
    return migrate_stored_config(stored, where=str(store.path.parent))


def read_stored_run(store: RunStore) -> StoredRun:
    """The config a run was created with, parsed again from its store."""
    config = stored_config(store)
    source = f"{store.path} (stored config)"
    if "level2" not in config:
        return StoredRun(level1=parse_run_config(config["level1"], source=source), level2=None)
    data = dict(config["level1"]) | {"level2": config["level2"]}
    cfg = parse_two_level_config(data, source=source)
    return StoredRun(level1=cfg.level1, level2=cfg.level2)


def stored_two_level_config(store: RunStore) -> TwoLevelConfig:
    """The two-level config a run was created with (refused for a level-1 search)."""
    return read_stored_run(store).two_level()
