"""The embedded default job (README Quick start, line 1).

For now: build a tiny base model and two "fine-tuned" variants locally (no
download), merge them with TIES through the same recipe path as ``hm3 merge``,
check the result loads in transformers, and print where everything went.
Later stages grow this into the full two-level search on the model zoo.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hm3.config import parse_merge_config
from hm3.errors import OutputExistsError


def run_demo(out: Path, *, overwrite: bool = False) -> Path:
    from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
    from hm3.merge.engine import merge_to_disk

    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"demo output already exists: {out} (use --overwrite to replace it)")
        shutil.rmtree(out)
    models = out / "models"
    print(f"[demo] building a tiny Llama base model and two variants in {models}")
    base = build_random_llama(models / "base", hidden_size=64, num_layers=4, vocab_size=256, seed=0)
    experts = [build_finetuned_variant(base, models / f"expert{i}", seed=i, scale=0.02) for i in (1, 2)]
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.6}} for e in experts],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    config = parse_merge_config(recipe, source="demo recipe")
    recipe_path = out / "recipe.yml"
    recipe_path.write_text(config.to_yaml())
    merged = out / "merged"
    report = merge_to_disk(config, merged)
    print(f"[demo] TIES merge of {len(experts)} models: {report.tensors} tensors in {report.seconds:.2f} s")

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    logits = model(torch.arange(8).unsqueeze(0)).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("merged model produced non-finite logits")
    print(f"[demo] recipe: {recipe_path}")
    print(f"[demo] merged model (Hugging Face format, loads in transformers): {merged}")
    return merged
