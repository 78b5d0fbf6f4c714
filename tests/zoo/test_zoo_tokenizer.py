"""The character tokenizer: exact round trip, special tokens, and loading back through AutoTokenizer."""

from __future__ import annotations

from transformers import AutoTokenizer

from hm3.zoo.tokenizer import CHARACTERS, VOCAB_SIZE, build_char_tokenizer, save_char_tokenizer

TEXT = "M 347+5=352\nT ab cd=xy zw\nC a=3;b=a-4;print(b)=-1 ~!{}"


def test_one_token_per_character_and_exact_round_trip():
    tok = build_char_tokenizer()
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 1 + len(TEXT)
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert len(tok) == VOCAB_SIZE == 3 + len(CHARACTERS)


def test_special_tokens_and_left_padding():
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    batch = tok(["M 1+2=", "M 10+2="], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_token_id and batch[1][0] == tok.bos_token_id


def test_saved_tokenizer_loads_with_autotokenizer_as_a_fast_tokenizer(tmp_path):
    save_char_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.is_fast
    assert loaded.padding_side == "left"
    original = build_char_tokenizer()
    assert loaded(TEXT)["input_ids"] == original(TEXT)["input_ids"]
    assert loaded.decode(loaded(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    assert (tmp_path / "tokenizer.json").is_file()
