"""A property of layer paths for any small decoder (hypothesis draws the architecture and the pool):
the path running the frame's own layers in order *is* the frame, logit for logit."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hm3.arch.path import LayerPath, LayerPool, build_path_model


@st.composite
def decoders(draw) -> dict:
    """A small causal LM's config: llama or qwen2, 1–3 layers, GQA or not, tied head or not."""
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(
        model_type=draw(st.sampled_from(["llama", "qwen2"])),
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=draw(st.sampled_from([8, 16])),
        num_hidden_layers=draw(st.integers(1, 3)),
        vocab_size=draw(st.sampled_from([16, 40])),
        tie_word_embeddings=draw(st.booleans()),
    )


@settings(max_examples=8, deadline=None)
@given(decoders(), st.integers(0, 2), st.integers(0, 2**31), st.integers(1, 7))
def test_the_frames_own_layers_in_order_are_the_frame(spec, experts, seed, length):
    """Pool = ``experts`` other models + the frame (last): LayerPath.of_model(frame) gives its logits exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**spec)
    torch.manual_seed(seed)
    pool_models = [AutoModelForCausalLM.from_config(config).eval() for _ in range(experts + 1)]
    frame = pool_models[-1]
    path = LayerPath.of_model(experts, config.num_hidden_layers)
    model = build_path_model(LayerPool.from_models(pool_models), path)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, frame(ids).logits)
