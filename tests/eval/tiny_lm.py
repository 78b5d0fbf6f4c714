"""Tiny random Llama models with a character-level tokenizer, built on the fly for the backend tests.

Nothing is downloaded: weights come from :func:`hm3.checkpoint.synthetic.build_random_llama`, the
tokenizer is a ``tokenizers`` BPE model without merges (one token per character) saved as a real
fast tokenizer that ``AutoTokenizer`` and vLLM load. The vocabulary fills the model's embedding
exactly, so every id a random model can emit decodes to a character.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: LlamaConfig's default bos/eos ids
VOCAB_SIZE = 128
# head_dim 64: a size every vLLM CPU attention kernel supports
HIDDEN, HEADS, LAYERS = 128, 2, 2


def _characters(n: int) -> list[str]:
    printable = ["\n"] + [chr(c) for c in range(32, 127)]
    extra = [chr(c) for c in range(0x3B1, 0x3B1 + n)]  # Greek letters fill the rest
    return (printable + extra)[:n]


def save_char_tokenizer(directory: Path, vocab_size: int = VOCAB_SIZE, *, bos: bool = True) -> None:
    """A fast tokenizer with BOS prepended (or, ``bos=False``, none: as GPT-2's and Qwen's), one token per
    character, saved into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = _characters(vocab_size - len(SPECIALS))
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>" if bos else None, eos_token="</s>"
    )
    fast.save_pretrained(str(directory))


def build_tiny_lm(
    directory: Path, *, seed: int = 0, tie_word_embeddings: bool = False, vocab_size: int = VOCAB_SIZE
) -> Path:
    """A random tiny Llama plus its tokenizer in ``directory`` (which must not exist yet)."""
    from hm3.checkpoint.synthetic import build_random_llama

    path = build_random_llama(
        directory,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
    )
    save_char_tokenizer(path, vocab_size=VOCAB_SIZE)
    return path
