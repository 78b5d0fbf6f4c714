"""A character-level tokenizer saved as a real fast tokenizer (``AutoTokenizer`` and vLLM load it).

One token per printable ASCII character plus newline; ``<pad>``, ``<s>``, ``</s>``
take ids 0, 1, 2 (LlamaConfig's defaults). Built with the ``tokenizers`` library
(a BPE model without merges is exactly a character vocabulary) and wrapped in
``PreTrainedTokenizerFast``; BOS is prepended, padding is on the left for
batched generation.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>")
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB_SIZE = len(SPECIALS) + len(CHARACTERS)  # 99


def filler_token(i: int) -> str:
    """The ``i``-th filler token: a string of several characters, which a BPE model without merges never
    produces from text, so fillers give a tokenizer more tokens without changing how it tokenises."""
    return f"<filler{i}>"


def build_char_tokenizer(size: int = VOCAB_SIZE):
    """The zoo's tokenizer as a ``PreTrainedTokenizerFast`` (what every zoo model directory carries);
    a ``size`` above :data:`VOCAB_SIZE` appends filler tokens (:func:`filler_token`) up to ``size`` tokens,
    for a stand-in of a model with a large vocabulary (``hm3 check``)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    if size < VOCAB_SIZE:
        raise ValueError(f"a character tokenizer has at least {VOCAB_SIZE} tokens, not {size}")
    fillers = [filler_token(i) for i in range(size - VOCAB_SIZE)]
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + CHARACTERS + fillers)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def save_char_tokenizer(directory: str | Path, size: int = VOCAB_SIZE) -> None:
    """Write tokenizer.json and its configs into ``directory`` (``AutoTokenizer`` loads them back)."""
    build_char_tokenizer(size).save_pretrained(str(directory))
