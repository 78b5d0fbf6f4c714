"""Translate an hm3 recipe into a mergekit config, where mergekit can express it."""

from __future__ import annotations

from typing import Any

from hm3.config import MergeConfig
from hm3.errors import ConfigError
from hm3.merge.methods import get_method


def to_mergekit(config: MergeConfig) -> dict[str, Any]:
    """A dict that ``mergekit-yaml`` accepts and that merges to the same result.

    hm3-only features are translated where mergekit has an equivalent
    (``rescale_mode: l1|none`` -> ``rescale: true|false``) and refused where it
    has none (Fisher weighting, the paper's 1/density rescale). ``seed`` is
    dropped: mergekit's DARE uses torch's global RNG, so DARE masks differ.
    """
    method = get_method(config.merge_method)
    if method.mergekit_name is None:
        raise ConfigError(f"mergekit has no equivalent of merge_method {method.name!r}")
    data = config.model_dump(exclude_none=True, mode="json")
    data.pop("seed", None)
    data["merge_method"] = method.mergekit_name

    def translate(params: dict[str, Any], where: str) -> dict[str, Any]:
        out = {}
        for k, v in params.items():
            if k == "fisher":
                raise ConfigError(f"{where}.fisher: mergekit has no Fisher weighting")
            if k == "rescale_mode":
                if v == "inverse":
                    raise ConfigError(f"{where}.rescale_mode: inverse (1/density) rescaling has no mergekit equivalent")
                out["rescale"] = v == "l1"
                continue
            out[k] = v
        return out

    if "parameters" in data:
        data["parameters"] = translate(data["parameters"], "parameters")
    for i, m in enumerate(data["models"]):
        if "parameters" in m:
            m["parameters"] = translate(m["parameters"], f"models[{i}].parameters")
    return data
