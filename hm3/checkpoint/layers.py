"""Which transformer block a tensor belongs to, from its name alone.

Per-layer merge parameters (mergekit's gradients) and layer recombination both
need "tensor -> block index" and "block i -> its tensors"; the checkpoint names
are the only portable source of that, so the mapping is a name pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A block container followed by its index: Llama/Mistral/Qwen 'model.layers.12.', GPT-2 'h.3.' and
# 'transformer.h.3.', GPT-NeoX 'gpt_neox.layers.3.', BERT-style 'encoder.layer.3.', 'blocks.3.'.
# Anchored on a dot (or the start) so 'lm_head.' or 'model.norm.' never match.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


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
