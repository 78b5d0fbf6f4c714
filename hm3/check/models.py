"""Stand-in models for ``hm3 check``: a tiny random model per config model, of the real one's family.

A check must say in seconds whether a config would run, without the weights. So each model is
replaced by one built here: the same ``model_type``, the same number of layers (so every setting
that names layers -- ``num_layers``, ``layer_granularity``, ``t_max``, ``swaps`` -- is checked
against the real depth), the same GQA ratio (heads per key/value head), tied or untied embeddings,
attention and MLP biases and the same MLP width ratio, at a hidden size of a few dozen. The base is
random; every other model is the base plus a small seeded perturbation, so merges have real task
vectors. All share a character-level toy tokenizer (:mod:`hm3.zoo.tokenizer`), each with its model's
chat template where the model's tokenizer files are here (``chat=true`` needs one), and their generation
config ends generation at any token: a random model's answers are noise whatever their length, and
generating hundreds of tokens per example is what would make a check take minutes.

A search that merges over the base's vocabulary (``search_space.tokenizer_source: base``) is checked
on stand-ins with the real models' vocabulary sizes: each has its model's ``vocab_size`` embedding
rows, and the base's toy tokenizer is filled up to the base's (:func:`hm3.zoo.tokenizer.filler_token`),
as a real base's tokenizer fills its embedding. The experts carry the base's tokenizer, so their extra
rows (an added pad token, infilling tokens) are tokens the base lacks, which ``base`` leaves out --
what it does with the real experts, whose added tokens the base does not have either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hm3.check.templates import TEMPLATES, find_template
from hm3.errors import ConfigError

#: Width of one attention head in a stand-in.
HEAD_DIM = 8
#: Embedding rows of a stand-in: the toy tokenizer's 99 tokens and room for the special tokens a
#: family's tokenizer class adds when transformers loads it (Qwen2's adds one).
VOCAB_ROWS = 128
#: config.json keys copied unchanged into a stand-in: they change the computation, not its size.
CARRIED = ("model_type", "num_hidden_layers", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
           "sliding_window", "use_sliding_window", "max_window_layers")
#: config.json keys that must agree across a config's models: a search merges them in memory over one
#: architecture and one vocabulary (:func:`hm3.checkpoint.reader.check_compatible`).
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings", "vocab_size")


#: Where a tokenizer keeps its chat template besides tokenizer_config.json's ``chat_template`` key.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ModelShape:
    """Where a model's architecture came from (``source``) and its config.json keys (``config``);
    ``folder``: the folder holding that config.json (None for a template)."""

    ref: str
    value: str
    source: str
    config: dict[str, Any]
    folder: Path | None = None


def _local_config(value: str, config_dir: Path) -> Path | None:
    """``config.json`` of the folder the run reads for ``value``: the first that exists, relative to the CWD
    then to the config's folder (:func:`hm3.checkpoint.hub.resolve_model`), whether or not it holds one."""
    for folder in (Path(value).expanduser(), config_dir / value):
        if folder.exists():
            return folder / "config.json"
    return None


def _cached_config(value: str) -> Path | None:
    """``config.json`` of a hub id in the local HF cache, never downloaded."""
    from huggingface_hub import try_to_load_from_cache

    from hm3.checkpoint.hub import hub_cache_dir, parse_hub_ref

    hub = parse_hub_ref(value)
    if hub is None:
        return None
    found = try_to_load_from_cache(hub.repo_id, "config.json", cache_dir=hub_cache_dir(),
                                   revision=hub.revision or "main")
    return Path(found) if isinstance(found, str) else None


def model_shape(ref: str, value: Any, config_dir: Path) -> ModelShape:
    """The architecture of config model ``ref`` (``models.REF: VALUE``): its config.json from a local
    folder or the HF cache, else a known-shape template; refused, naming the key, when neither exists."""
    if not isinstance(value, str):
        raise ConfigError(f"models.{ref}: expected a directory or hub id, got {value!r}")
    path = _local_config(value, config_dir) or _cached_config(value)
    if path is not None:
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"models.{ref}: cannot read {path}: {err}") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise ConfigError(f"models.{ref}: {path} holds no model_type: not a Hugging Face model config")
        return ModelShape(ref, value, f"config.json at {path}", config, path.parent)
    template = find_template(value)
    if template is None:
        known = ", ".join(sorted(TEMPLATES))
        raise ConfigError(
            f"models.{ref}: {value!r}: no config.json here (not a local folder holding one, relative to the CWD "
            f"or to {config_dir}, nor in the Hugging Face cache) and no known-shape template for it; put the "
            f"model's config.json in a folder of that name, or name one of: {known}")
    hub, config = template
    return ModelShape(ref, value, f"template {hub} (its published config.json; not read here)", config)


def _int(shape: ModelShape, key: str) -> int:
    value = shape.config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"models.{shape.ref}: {shape.source}: {key} is {value!r}, not a positive whole number")
    return value


def standin_config(shape: ModelShape, vocab_size: int) -> dict[str, Any]:
    """A tiny config.json of ``shape``'s family and ratios (module docstring), over a ``vocab_size`` vocabulary."""
    for key in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in shape.config:  # e.g. T5 (d_model, num_heads): say what it is, not which key it lacks
            raise ConfigError(f"models.{shape.ref}: model_type {shape.config.get('model_type')!r} ({shape.source}) "
                              f"has no {key}: hm3 merges and evaluates decoder-only causal LMs "
                              "(Llama, Mistral, Qwen2 and the like), not this architecture")
    heads = _int(shape, "num_attention_heads")
    kv = shape.config.get("num_key_value_heads") or heads
    if heads % kv:
        raise ConfigError(f"models.{shape.ref}: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv} ({shape.source})")
    ratio = heads // kv
    kv_small = 2 if ratio == 1 else 1
    hidden = kv_small * ratio * HEAD_DIM
    width = _int(shape, "intermediate_size") / _int(shape, "hidden_size")
    out = {k: shape.config[k] for k in CARRIED if k in shape.config}
    out |= {"hidden_size": hidden, "intermediate_size": max(8, round(width * hidden)),
            "num_attention_heads": kv_small * ratio, "num_key_value_heads": kv_small, "head_dim": HEAD_DIM,
            "vocab_size": vocab_size, "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1,
            "eos_token_id": 2}
    return out


def shape_value(config: dict[str, Any], key: str) -> Any:
    """``key`` of a config.json as transformers reads it: a key left out (``save_pretrained`` leaves out
    those that hold their default) has the family's default; None where the family is unknown."""
    if key in config:
        return config[key]
    if key == "num_key_value_heads":  # no GQA: one key/value head per query head
        return config.get("num_attention_heads")
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.for_model(config.get("model_type")), key, None)
    except (ValueError, KeyError, TypeError):
        return None


def shape_conflicts(shapes: list[ModelShape], *, own_vocabularies: bool = False) -> list[str]:
    """Architecture keys on which the models differ (a merge needs one architecture), one line each;
    ``own_vocabularies``: the vocabulary sizes may differ (a search with a tokenizer source)."""
    lines = []
    for key in SHAPE_KEYS:
        if own_vocabularies and key == "vocab_size":
            continue
        values = {s.ref: shape_value(s.config, key) for s in shapes}
        if len(set(map(repr, values.values()))) > 1:
            lines.append(f"{key}: " + ", ".join(f"{ref} {v!r}" for ref, v in values.items()))
    return lines


def build_standins(shapes: list[ModelShape], base_ref: str, out_dir: Path, *, seed: int,
                   own_vocabularies: bool = False) -> dict[str, Path]:
    """Stand-in model folders, one per shape: the base random, the others base + seeded perturbation;
    ``own_vocabularies``: each with its model's ``vocab_size`` rows (module docstring)."""
    from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_causal_lm
    from hm3.zoo.tokenizer import VOCAB_SIZE, save_char_tokenizer

    by_ref = {s.ref: s for s in shapes}
    base = by_ref[base_ref]
    rows = {s.ref: _int(s, "vocab_size") if own_vocabularies else VOCAB_ROWS for s in shapes}
    if rows[base_ref] < VOCAB_SIZE:
        raise ConfigError(f"models.{base_ref}: vocab_size {rows[base_ref]} ({base.source}) is smaller than the "
                          f"check's toy tokenizer ({VOCAB_SIZE} tokens)")
    try:
        base_dir = build_random_causal_lm(out_dir / base_ref, standin_config(base, rows[base_ref]), seed=seed)
    except ValueError as err:  # transformers: an unknown model type, or one that is not a causal LM
        raise ConfigError(f"models.{base_ref}: cannot build a {base.config.get('model_type')!r} causal LM "
                          f"({base.source}): {err}") from None
    save_char_tokenizer(base_dir, rows[base_ref] if own_vocabularies else VOCAB_SIZE)
    # every token ends generation (module docstring): answers stay one token long
    ends = list(range(max(rows.values())))
    (base_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": ends, "pad_token_id": 0,
                                                                 "bos_token_id": 1}))
    dirs = {base_ref: base_dir}
    for i, shape in enumerate(s for s in shapes if s.ref != base_ref):
        dirs[shape.ref] = build_finetuned_variant(base_dir, out_dir / shape.ref, seed=seed + 1 + i, scale=0.05)
        if rows[shape.ref] != rows[base_ref]:
            _set_rows(dirs[shape.ref], rows[shape.ref], seed=seed + 1 + i)
        for extra in ("generation_config.json",):
            (dirs[shape.ref] / extra).write_text((base_dir / extra).read_text())
    for shape in shapes:
        _copy_chat_template(shape.folder, dirs[shape.ref])
    return dirs


def _copy_chat_template(model_dir: Path | None, standin: Path) -> None:
    """Give a stand-in its model's chat template, where the model's tokenizer files are here: ``chat=true``
    (``evaluation.chat_template``) needs one, and the toy tokenizer has none of its own."""
    if model_dir is None:
        return
    for name in CHAT_TEMPLATE_FILES:
        if (model_dir / name).is_file():
            (standin / name).write_text((model_dir / name).read_text())
    try:
        template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # no readable tokenizer config: the model has no template hm3 could use either
    if template:
        config_path = standin / "tokenizer_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": template}, indent=2))


def _set_rows(directory: Path, rows: int, *, seed: int) -> None:
    """Give a stand-in ``rows`` vocabulary rows: its token embedding and LM head cut, or extended with seeded
    random rows of their own scale (the rows of tokens its model has and the base lacks)."""
    import torch
    from safetensors.torch import load_file, save_file

    from hm3.checkpoint.layers import is_vocabulary_tensor

    gen = torch.Generator().manual_seed(seed)
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        tensors = load_file(f)
        for name, t in tensors.items():
            if is_vocabulary_tensor(name):
                extra = torch.randn((max(0, rows - t.shape[0]), *t.shape[1:]), generator=gen) * t.float().std()
                tensors[name] = torch.cat([t[:rows], extra.to(t.dtype)])
        save_file(tensors, f, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": rows}, indent=2))
