"""Known model shapes, for ``hm3 check`` when a config names a model whose ``config.json`` is not here.

A check builds a tiny stand-in of each model from its shape (:mod:`hm3.check.models`); the shape
comes from the model's own ``config.json`` when it is on this machine (a local folder or the
Hugging Face cache), else from this table, keyed by hub id. The values are the architecture keys
of each model's published ``config.json`` (as written on its hub page; hm3 check never downloads
one). A local path is matched by its last component (``/models/Qwen2.5-1.5B-Instruct`` finds
``Qwen/Qwen2.5-1.5B-Instruct``), since users keep hub snapshots under their own folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

_LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False,
              "attention_bias": False, "vocab_size": 32000}
_MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False, "vocab_size": 32000}
_QWEN25_1P5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
                "vocab_size": 151936}
_T5_BASE = {"model_type": "t5", "d_model": 768, "d_ff": 3072, "num_layers": 12, "num_decoder_layers": 12,
            "num_heads": 12, "vocab_size": 32128, "tie_word_embeddings": True}

#: hub id (lower case) -> architecture keys of its config.json
TEMPLATES: dict[str, dict[str, Any]] = {
    "meta-llama/llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/llama-2-7b-chat-hf": _LLAMA2_7B,
    "wizardlmteam/wizardmath-7b-v1.0": _LLAMA2_7B | {"vocab_size": 32001},
    "codellama/codellama-7b-hf": _LLAMA2_7B | {"vocab_size": 32016},
    "qwen/qwen2.5-1.5b": _QWEN25_1P5B,
    "qwen/qwen2.5-1.5b-instruct": _QWEN25_1P5B,
    "qwen/qwen2.5-coder-1.5b-instruct": _QWEN25_1P5B,
    "qwen/qwen2.5-math-1.5b-instruct": _QWEN25_1P5B,
    "mistralai/mistral-7b-v0.1": _MISTRAL_7B,
    "augmxnt/shisa-gamma-7b-v1": _MISTRAL_7B,
    "wizardlmteam/wizardmath-7b-v1.1": _MISTRAL_7B,
    "gair/abel-7b-002": _MISTRAL_7B,
    "google-t5/t5-base": _T5_BASE,
}


def find_template(ref: str, templates: Mapping[str, dict[str, Any]] = TEMPLATES) -> tuple[str, dict[str, Any]] | None:
    """(hub id, shape) of the template ``ref`` names: a hub id (``org/name[@rev]``, any case) or a path
    whose last component is a template's model name; None when no template fits."""
    key = ref.partition("@")[0].strip().lower().rstrip("/")
    if key in templates:
        return key, dict(templates[key])
    name = PurePath(key).name
    matches = [hub for hub in templates if hub.split("/", 1)[1] == name]
    return (matches[0], dict(templates[matches[0]])) if len(matches) == 1 else None
