"""Which transformer block a tensor belongs to, from its name alone.

Per-layer merge parameters (mergekit's gradients) and layer recombination both
need "tensor -> block index" and "block i -> its tensors"; the checkpoint names
are the only portable source of that, so the mapping is a name pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hm3.errors import ConfigError

# A block container followed by its index: Llama/Mistral/Qwen 'model.layers.12.', GPT-2 'h.3.' and
# 'transformer.h.3.', GPT-NeoX 'gpt_neox.layers.3.', BERT-style 'encoder.layer.3.', 'blocks.3.'.
# Anchored on a dot (or the start) so 'lm_head.' or 'model.norm.' never match.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
# Input embeddings (token and learned position): the tensors *before* the layers. Everything else outside
# the layers (final norm, LM head, GPT-NeoX's 'embed_out') comes after them.
_INPUT_EMBEDDING_RE = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|embed_positions|wte|wpe)\.")
# Tensors with one row per token (the token embedding, the LM head): a merge over another vocabulary
# rearranges their rows. Position embeddings ('wpe', 'embed_positions') have one row per position instead.
_VOCABULARY_RE = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|embed_out|wte|lm_head)\.weight$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Pre-norm-only decoders: every branch input is normalised and nothing normalises a branch output,
# so scaling o_proj/down_proj scales exactly the layer's contribution to the residual stream.
SCALABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Name fragments of the projections ending a layer's attention and MLP branches.
BRANCH_OUTPUTS = ("self_attn.o_proj.", "mlp.down_proj.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block index of ``tensor_name``; None for embeddings, final norm and lm_head."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_tensor_names(names: Iterable[str], i: int) -> list[str]:
    """The tensors of block ``i`` among ``names``, in the order given."""
    return [n for n in names if layer_index(n) == i]


def rename_layer(name: str, new_index: int) -> str:
    """``name`` moved to block ``new_index`` (e.g. to place layer 5 of one model at depth 2 of another)."""
    if new_index < 0:
        raise ValueError(f"layer index must be >= 0, got {new_index}")
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"tensor {name!r} does not belong to a transformer layer")
    start, end = m.span(1)
    return f"{name[:start]}{new_index}{name[end:]}"


def is_input_embedding(tensor_name: str) -> bool:
    """Whether a tensor outside the layers comes before them (token or position embedding)."""
    return layer_index(tensor_name) is None and _INPUT_EMBEDDING_RE.search(tensor_name) is not None


def is_vocabulary_tensor(tensor_name: str) -> bool:
    """Whether a tensor has one row per token of the vocabulary (token embedding, LM head)."""
    return layer_index(tensor_name) is None and _VOCABULARY_RE.search(tensor_name) is not None


def is_branch_output(tensor_name: str) -> bool:
    """Whether a layer tensor ends an attention or MLP branch (what a hop's scale multiplies)."""
    return any(frag in tensor_name for frag in BRANCH_OUTPUTS)


def check_scales_exact(model_type: str | None, what: str = "per-hop scales") -> None:
    """Refuse (ConfigError) scales for a model type on which they are not an exact weight change.

    Only there does multiplying a layer's branch outputs scale exactly its contribution to the
    residual stream; a norm after a branch (Gemma 2/3's sandwich norms) would undo the scale.
    """
    if model_type not in SCALABLE_MODEL_TYPES:
        raise ConfigError(
            f"{what} are only defined for pre-norm models ({', '.join(sorted(SCALABLE_MODEL_TYPES))}); "
            f"model type {model_type!r} may normalise branch outputs, which would undo the scale"
        )


def relayered_config(config: Mapping[str, Any], source_layers: Sequence[int]) -> dict[str, Any]:
    """``config`` for a model whose layer i is layer ``source_layers[i]`` of a model with this config.

    The layer count is set under the key the config uses, and per-layer entries (``layer_types``,
    e.g. Qwen2's sliding or full attention) follow their layers: transformers refuses a config whose
    ``layer_types`` does not have one entry per layer.
    """
    out = dict(config)
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), "num_hidden_layers")
    out[key] = len(source_layers)
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        out["layer_types"] = [layer_types[i] for i in source_layers]
    if config.get("use_sliding_window") and isinstance(config.get("max_window_layers"), int):
        out["max_window_layers"] = _max_window_layers(config, source_layers)
    return out


def _max_window_layers(config: Mapping[str, Any], source_layers: Sequence[int]) -> int:
    """Qwen2's ``max_window_layers`` for the relayered model: the layers from it up use sliding-window
    attention, and vLLM decides each layer's attention by that rule alone (transformers by ``layer_types``
    where the config has them), so it must describe the relayered layers' own kinds. A sliding layer
    below a full one has no such number and is refused."""
    types = config.get("layer_types")
    if isinstance(types, list):
        sliding = [types[i] == "sliding_attention" for i in source_layers]
    else:
        sliding = [i >= config["max_window_layers"] for i in source_layers]
    first = sliding.index(True) if any(sliding) else len(sliding)
    if not all(sliding[first:]):
        raise ConfigError(
            f"this layer order puts a sliding-window layer (output layer {first}) below a full-attention one, "
            "which a config's max_window_layers cannot express (vLLM reads attention kinds from it); keep the "
            "source model's sliding-window layers above its full-attention ones"
        )
    return first
