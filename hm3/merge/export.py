"""Translate an hm3 recipe into a mergekit config, where mergekit can express it."""

from __future__ import annotations

from collections.abc import Sequence
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

    takes_mode = method.param("rescale_mode") is not None  # else hm3 ignores rescale_mode, and so may mergekit

    def translate(params: dict[str, Any], where: str) -> tuple[dict[str, Any], Any]:
        """``params`` without hm3's keys, and its ``rescale_mode`` as mergekit's ``rescale`` (None: not given)."""
        out = {}
        for k, v in params.items():
            if k == "fisher":
                raise ConfigError(f"{where}.fisher: mergekit has no Fisher weighting")
            if k != "rescale_mode":
                out[k] = v
        mode = params.get("rescale_mode") if takes_mode else None
        return out, None if mode is None else _rescale_setting(mode, f"{where}.rescale_mode")

    # hm3 asks rescale_mode before rescale, each scope's from the most specific out; mergekit asks only
    # rescale, so each scope's rescale becomes the chain hm3 would ask from that scope on
    top_mode = None
    if "parameters" in data:
        data["parameters"], top_mode = translate(data["parameters"], "parameters")
        _set_rescale(data["parameters"], top_mode, data["parameters"].get("rescale"))
    for i, m in enumerate(data.get("models", [])):
        if "parameters" in m:
            m["parameters"], mode = translate(m["parameters"], f"models[{i}].parameters")
            _set_rescale(m["parameters"], mode, m["parameters"].get("rescale"))
    for i, s in enumerate(data.get("slices", [])):
        if "parameters" in s:
            s["parameters"], mode = translate(s["parameters"], f"slices[{i}].parameters")
            if mode is not None or "rescale" in s["parameters"]:
                _set_rescale(s["parameters"], mode, top_mode, s["parameters"].get("rescale"))
        for j, src in enumerate(s["sources"]):
            if "parameters" in src:
                src["parameters"], mode = translate(src["parameters"], f"slices[{i}].sources[{j}].parameters")
                _set_rescale(src["parameters"], mode, src["parameters"].get("rescale"))
    return data


def _set_rescale(params: dict[str, Any], *chain: Any) -> None:
    """Set ``params['rescale']`` to the settings of ``chain`` asked in turn (None: not given), if any is given."""
    given = [c for c in chain if c is not None]
    if not given:
        return
    conditions: list[Any] = []
    for setting in given:
        if not _is_conditions(setting):  # a plain value (or gradient) gives every tensor a value: the end
            params["rescale"] = setting if not conditions else [*conditions, {"value": setting}]
            return
        conditions += setting
    params["rescale"] = conditions


def _is_conditions(setting: Any) -> bool:
    return isinstance(setting, list) and all(isinstance(c, dict) and "value" in c for c in setting)


def _rescale_setting(setting: Any, where: str) -> Any:
    """hm3's ``rescale_mode`` setting as mergekit's ``rescale``, value by value: ``l1`` is true, ``none`` false,
    and a list of ``{filter, value}`` keeps its filters; ``inverse`` has no mergekit equivalent."""
    if _is_conditions(setting):
        return [{**c, "value": _rescale_setting(c["value"], where)} for c in setting]
    if setting == "inverse":
        raise ConfigError(f"{where}: inverse (1/keep-probability) rescaling has no mergekit equivalent")
    if setting in ("l1", "none"):
        return setting == "l1"
    raise ConfigError(f"{where}: {setting!r} has no mergekit equivalent; give l1, none or a list of "
                      "{filter, value} of them")


def mergekit_notes(config: MergeConfig, exported_as: str, *, tied_head_copies: Sequence[str] = ()) -> list[str]:
    """What the exported YAML cannot say, as comment lines: for a random method (DARE, DELLA) the seed, and
    the models whose files store a copy of their tied head (``tied_head_copies``).

    mergekit 0.1.5 has no config key for a seed; ``mergekit-yaml --random-seed N`` seeds torch's
    global generator, which makes mergekit's own merge repeatable. Its drop masks still differ from
    hm3's (one generator per tensor and model), so the note says so instead of promising hm3's tensors.
    hm3 reads a stored copy of a tied head as the tied tensor it is (:class:`~hm3.checkpoint.reader.Checkpoint`);
    mergekit merges the copy apart, under its own drop mask, so its merged head and embedding differ and a tied
    model loads only one of them: the note names the models, as nothing in the YAML can change that.
    """
    if not get_method(config.merge_method).uses_randomness:
        return []
    seed = config.seed if config.seed is not None else DEFAULT_SEED
    rng = config.mask_rng or DEFAULT_MASK_RNG
    notes = [
        f"hm3 draws {config.merge_method}'s drop masks with seed {seed} and mask_rng {rng} (hm3 merge --seed "
        "overrides the seed). mergekit has",
        "no config key for a seed; this command makes its merge repeatable, with mergekit's own masks:",
        f"  mergekit-yaml {exported_as} OUTPUT_DIR --random-seed {seed}",
        "Its tensors differ from hm3's: mergekit draws from torch's global generator, hm3 one per tensor and model.",
    ]
    if tied_head_copies:
        notes += [
            f"These models tie their head to the embedding and also store it: {', '.join(tied_head_copies)}.",
            "hm3 merges the two as one tensor; mergekit merges the stored head apart, under a drop mask of its own,",
            "so its merged head differs from its merged embedding, and a tied model loads only one of the two.",
        ]
    return notes
