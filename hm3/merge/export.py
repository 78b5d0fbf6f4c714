"""Translate an hm3 recipe into a mergekit config, where mergekit can express it."""

from __future__ import annotations

from typing import Any

from hm3.config import MergeConfig
from hm3.errors import ConfigError
from hm3.merge.methods import get_method
from hm3.merge.plan import DEFAULT_MASK_RNG, DEFAULT_SEED


def to_mergekit(config: MergeConfig) -> dict[str, Any]:
    """A dict that ``mergekit-yaml`` accepts and that merges to the same result.

    hm3-only features are translated where mergekit has an equivalent
    (``rescale_mode: l1|none`` -> ``rescale: true|false``) and refused where it
    has none (Fisher weighting, the papers' 1/keep-probability rescale). ``seed`` and
    ``mask_rng`` are dropped: mergekit has no config key for them (see :func:`mergekit_notes`).
    """
    method = get_method(config.merge_method)
    if method.mergekit_name is None:
        raise ConfigError(f"mergekit has no equivalent of merge_method {method.name!r}")
    data = config.model_dump(exclude_none=True, mode="json")
    data.pop("seed", None)
    data.pop("mask_rng", None)  # hm3's choice of mask generator: mergekit draws from torch's global one
    data["merge_method"] = method.mergekit_name

    def translate(params: dict[str, Any], where: str) -> dict[str, Any]:
        out = {}
        for k, v in params.items():
            if k == "fisher":
                raise ConfigError(f"{where}.fisher: mergekit has no Fisher weighting")
            if k != "rescale_mode":
                out.setdefault(k, v)  # a ``rescale`` beside ``rescale_mode`` gives way to it, as in hm3
        if "rescale_mode" in params and method.param("rescale_mode") is not None:  # else hm3 ignores it too
            out["rescale"] = _rescale_setting(params["rescale_mode"], f"{where}.rescale_mode")
        return out

    if "parameters" in data:
        data["parameters"] = translate(data["parameters"], "parameters")
    for i, m in enumerate(data.get("models", [])):
        if "parameters" in m:
            m["parameters"] = translate(m["parameters"], f"models[{i}].parameters")
    for i, s in enumerate(data.get("slices", [])):
        if "parameters" in s:
            s["parameters"] = translate(s["parameters"], f"slices[{i}].parameters")
        for j, src in enumerate(s["sources"]):
            if "parameters" in src:
                src["parameters"] = translate(src["parameters"], f"slices[{i}].sources[{j}].parameters")
    return data


def _rescale_setting(setting: Any, where: str) -> Any:
    """hm3's ``rescale_mode`` setting as mergekit's ``rescale``, value by value: ``l1`` is true, ``none`` false,
    and a list of ``{filter, value}`` keeps its filters; ``inverse`` has no mergekit equivalent."""
    if isinstance(setting, list) and all(isinstance(c, dict) and "value" in c for c in setting):
        return [{**c, "value": _rescale_setting(c["value"], where)} for c in setting]
    if setting == "inverse":
        raise ConfigError(f"{where}: inverse (1/keep-probability) rescaling has no mergekit equivalent")
    if setting in ("l1", "none"):
        return setting == "l1"
    raise ConfigError(f"{where}: {setting!r} has no mergekit equivalent; give l1, none or a list of "
                      "{filter, value} of them")


def mergekit_notes(config: MergeConfig, exported_as: str) -> list[str]:
    """What the exported YAML cannot say, as comment lines: for a random method (DARE, DELLA) the seed.

    mergekit 0.1.5 has no config key for a seed; ``mergekit-yaml --random-seed N`` seeds torch's
    global generator, which makes mergekit's own merge repeatable. Its drop masks still differ from
    hm3's (one generator per tensor and model), so the note says so instead of promising hm3's tensors.
    """
    if not get_method(config.merge_method).uses_randomness:
        return []
    seed = config.seed if config.seed is not None else DEFAULT_SEED
    rng = config.mask_rng or DEFAULT_MASK_RNG
    return [
        f"hm3 draws {config.merge_method}'s drop masks with seed {seed} and mask_rng {rng} (hm3 merge --seed "
        "overrides the seed). mergekit has",
        "no config key for a seed; this command makes its merge repeatable, with mergekit's own masks:",
        f"  mergekit-yaml {exported_as} OUTPUT_DIR --random-seed {seed}",
        "Its tensors differ from hm3's: mergekit draws from torch's global generator, hm3 one per tensor and model.",
    ]
