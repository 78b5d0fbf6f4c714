"""Tiny random Llama checkpoints built on the fly, for tests, benchmarks and demos.

Nothing may be downloaded at run time, so every model the tests merge is built
here: a random base via transformers' own ``LlamaForCausalLM`` (so the files are
exactly what Hugging Face writes) and "fine-tuned" variants that are the base plus
a seeded perturbation, giving a base and several experts with real task vectors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hm3.checkpoint.reader import check_finite, open_checkpoint
from hm3.checkpoint.writer import CheckpointWriter, StagedDirectory


def build_random_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 128,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    sharded_bytes: int | None = None,
    save_format: str = "safetensors",
    overwrite: bool = False,
) -> Path:
    """A randomly initialised Llama saved as a HF directory; same arguments give identical weights.

    ``sharded_bytes`` sets the maximum shard size (forcing a sharded checkpoint with an
    index); ``save_format="bin"`` writes ``pytorch_model.bin`` (a ``torch.save`` state dict).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if save_format not in ("safetensors", "bin"):
        raise ValueError(f"save_format must be 'safetensors' or 'bin', got {save_format!r}")
    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype).eval()
        _randomise_norms(model)
    stage = StagedDirectory(out_dir, overwrite=overwrite)
    try:
        if save_format == "bin":
            model.config.save_pretrained(stage.tmp)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            if tie_word_embeddings:
                state.pop("lm_head.weight", None)
            torch.save(state, stage.tmp / "pytorch_model.bin")
        else:
            _save_quietly(model, stage.tmp, max_shard_size=sharded_bytes or "50GB")
        return stage.commit()
    except BaseException:
        stage.abort()
        raise


def build_random_causal_lm(out_dir: str | Path, config: dict, *, seed: int = 0, overwrite: bool = False) -> Path:
    """A randomly initialised causal LM of any transformers architecture, from a ``config.json``-style
    mapping (``model_type`` plus that architecture's keys); same arguments give identical weights.

    :func:`build_random_llama` covers the tests' Llama models; this one builds the stand-ins of
    ``hm3 check`` in whatever family a run config names (qwen2, mistral, ...). A type that is not a
    decoder-only causal LM in transformers (T5, BERT, an unknown name) raises :class:`ValueError`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **options)  # ValueError: unknown model type
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config).float().eval()  # ValueError: not a causal LM
        _randomise_norms(model)
    stage = StagedDirectory(out_dir, overwrite=overwrite)
    try:
        _save_quietly(model, stage.tmp, max_shard_size="50GB")
        return stage.commit()
    except BaseException:
        stage.abort()
        raise


def _save_quietly(model: torch.nn.Module, directory: Path, *, max_shard_size: int | str) -> None:
    """``save_pretrained`` without its per-shard progress bar (noise in test and demo output)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights start at exactly 1; jitter them so merges of norms are not trivially equal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))


def build_finetuned_variant(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    scale: float = 0.01,
    overwrite: bool = False,
) -> Path:
    """``base + scale * rms(base tensor) * N(0, 1)`` per tensor, same config; a stand-in "expert".

    The perturbation is relative (``||delta|| ~ scale * ||w||`` per tensor) so every
    tensor moves, whatever its magnitude. Streams tensor by tensor, so it also works
    for the ~125M-parameter benchmark models.
    """
    gen = torch.Generator().manual_seed(seed)
    with (
        open_checkpoint(base_dir) as base,
        CheckpointWriter(
            out_dir, config=base.config, overwrite=overwrite, tokenizer_from=base_dir, background=True
        ) as writer,
    ):
        for name in base.tensor_names():
            w = base.get(name)
            check_finite(name, w, str(base.path))
            if w.is_floating_point():
                w32 = w.float()
                rms = w32.pow(2).mean().sqrt()
                noise = torch.randn(w32.shape, generator=gen)
                w = (w32 + scale * rms * noise).to(w.dtype)
            writer.add(name, w)
    return Path(out_dir)
