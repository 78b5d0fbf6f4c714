"""The zoo's training loop: the forward pass in another dtype (autocast) with float32 weights."""

from __future__ import annotations

import torch

from hm3.zoo.train import train


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


ENCODED = [([1, 5 + i % 7, 9, 11 + i % 5, 2], 2) for i in range(12)]  # (ids, where the answer starts)


def _trained(autocast):
    model = _model()
    loss = train(model, ENCODED, steps=4, batch_size=4, lr=1e-2, seed=3, pad_id=0, warmup=1, autocast=autocast)
    return model, loss


def test_autocast_trains_in_bfloat16_and_keeps_float32_weights():
    plain, plain_loss = _trained(None)
    again, again_loss = _trained(None)
    mixed, mixed_loss = _trained(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())  # weights and updates stay float32
    assert torch.isfinite(torch.tensor([plain_loss, mixed_loss])).all()
    w = {n: p for n, p in plain.named_parameters()}
    # seeded: float32 training repeats exactly; the bf16 forward pass changes the updates, a little
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in w.items()) and plain_loss == again_loss
    init = dict(_model().named_parameters())
    assert any(not torch.equal(p, w[n]) for n, p in mixed.named_parameters())
    # ... but they move the weights the same way: bf16's rounding is small beside the updates
    plain_step = torch.cat([(w[n] - init[n]).flatten() for n in w])
    mixed_step = torch.cat([(p - init[n]).flatten() for n, p in mixed.named_parameters()])
    assert torch.nn.functional.cosine_similarity(plain_step, mixed_step, dim=0) > 0.9
    assert abs(mixed_loss - plain_loss) < 0.1


def test_frozen_embeddings_train_the_layers_only_and_restore_requires_grad():
    from hm3.zoo.train import frozen_embeddings

    init = {n: p.detach().clone() for n, p in _model().named_parameters()}
    model = _model()
    with frozen_embeddings(model):
        train(model, ENCODED, steps=4, batch_size=4, lr=1e-2, seed=3, pad_id=0, warmup=1)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, init[n])}
    assert "model.embed_tokens.weight" not in moved and "lm_head.weight" not in moved
    assert moved == set(init) - {"model.embed_tokens.weight", "lm_head.weight"}  # every other tensor trains
    assert all(p.requires_grad for p in model.parameters())
    unfrozen = _model()
    with frozen_embeddings(unfrozen, False):
        train(unfrozen, ENCODED, steps=4, batch_size=4, lr=1e-2, seed=3, pad_id=0, warmup=1)
    assert not torch.equal(unfrozen.lm_head.weight, init["lm_head.weight"])
