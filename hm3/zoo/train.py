"""Training the zoo's tiny models: a base on the task mixture, then one expert per task.

Plain torch (AdamW, loss on the answer tokens only), seeded, single process.
The experts are *full* fine-tunes of the base kept short and at a modest
learning rate, with a little replay of the other tasks, so they stay in the
base's basin — which is what makes merging them meaningful (the zoo build
measures that a TIES merge keeps their gains).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from hm3.errors import ConfigError
from hm3.zoo.spec import ZooSpec
from hm3.zoo.tokenizer import VOCAB_SIZE
from objectives.base import Example

IGNORE = -100  # label id that cross-entropy skips: prompt and padding positions
MAX_POSITIONS = 128

Encoded = tuple[list[int], int]  # (BOS + prompt + answer + EOS ids, index where the answer starts)


def encode_examples(tokenizer, examples: Sequence[Example]) -> list[Encoded]:
    """Token ids of each example as trained on: the answer ends with the stop newline, then EOS."""
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    answers = tokenizer([e.target + "\n" for e in examples], add_special_tokens=False)["input_ids"]
    return [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompts, answers, strict=True)]


def collate(encoded: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels, attention_mask); labels only on answer tokens."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, start) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def new_model(spec: ZooSpec):
    """A freshly initialised tiny Llama (seeded by the spec); ids 0/1/2 are pad/BOS/EOS as in the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def train(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    warmup: int = 20,
    log: Callable[[str], None] | None = None,
    autocast: torch.dtype | None = None,
) -> float:
    """``steps`` AdamW steps on seeded random batches of ``encoded``; returns the last batch's loss.

    Linear warm-up then linear decay to 10%: short runs need the high early rate to
    get anywhere and the low late rate to settle. Batches go to the model's device, so a
    model moved to a GPU trains there. ``autocast`` (e.g. ``torch.bfloat16``) runs the
    forward pass in that dtype under :func:`torch.autocast` while the weights and AdamW's
    state stay float32: pure bf16 weights would lose the small updates of a low learning rate.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / max(1, steps))
    )
    loss_value = float("nan")
    for step in range(steps):
        batch = collate(rng.sample(encoded, min(batch_size, len(encoded))), pad_id)
        input_ids, labels, mask = (t.to(device) for t in batch)
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if log is not None and (step + 1) % max(1, steps // 2) == 0:
            log(f"  step {step + 1}/{steps} loss {loss_value:.3f}")
    model.eval()
    return loss_value


@contextlib.contextmanager
def frozen_embeddings(model: torch.nn.Module, frozen: bool = True) -> Iterator[None]:
    """Within the block the token embeddings and the output head take no gradient (so no update), when
    ``frozen``; each parameter's ``requires_grad`` is restored after."""
    params = [model.get_input_embeddings().weight, model.get_output_embeddings().weight] if frozen else []
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def expert_data(
    train_sets: Mapping[str, Sequence[Encoded]],
    task: str,
    replay_fraction: float,
    replay_weights: Mapping[str, float] | None = None,
) -> list[Encoded]:
    """The expert's own training set plus ``replay_fraction`` of the pool from the other tasks.

    Replay keeps fine-tuning from overwriting what the base knows of the other
    tasks, so the task vectors interfere less when merged — as with real experts
    fine-tuned from a strong base. ``replay_weights`` (task -> relative share, 1 when
    absent) splits the replay between the other tasks: replaying a task less keeps the
    other experts from learning it, which is what its expert's margin needs. A task whose
    pool is smaller than its share is refused (:class:`ConfigError`): taking what there is
    would replay less than the spec says.
    """
    own = list(train_sets[task])
    others = [t for t in train_sets if t != task]
    if not others or replay_fraction <= 0:
        return own
    total = int(len(own) * replay_fraction / (1 - replay_fraction))
    weights = {t: (replay_weights or {}).get(t, 1.0) for t in others}
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        return own
    quotas = {t: int(total * weights[t] / weight_sum) for t in others}
    for t in others:
        if quotas[t] > len(train_sets[t]):
            raise ConfigError(f"the {task} expert's replay of {t!r} takes {quotas[t]} items but its pool holds "
                              f"{len(train_sets[t])}: lower replay_fraction or {t}'s replay weight, or raise "
                              f"{t}'s specialist_share")
    return own + [x for t in others for x in list(train_sets[t])[: quotas[t]]]
