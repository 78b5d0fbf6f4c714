"""PathPolicy: feature checks, Wolpertinger selection, stored log-probs, the RMM categorical head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hm3.arch.env import PathEnv
from hm3.arch.policy import PathPolicy, collate
from hm3.arch.rl_config import Level2Config

torch.set_num_threads(1)


def make(mode: str = "hm3", **overrides) -> tuple[PathEnv, PathPolicy]:
    torch.manual_seed(0)
    config = Level2Config(mode=mode, dar=False, **overrides)
    env = PathEnv(
        pool_size=3, num_layers=4, n_objectives=2, scorer=lambda p: np.zeros(2), config=config, lam=np.array([0.6, 0.4])
    )
    policy = PathPolicy(
        pool_size=3, num_layers=4, n_objectives=2, layer_features=torch.randn(3, 4, 5), config=config
    )
    return env, policy


def test_layer_feature_shapes_are_checked() -> None:
    _, policy = make()
    with pytest.raises(ValueError, match=r"\[3, 4, 5\]"):
        policy.set_layer_features(torch.randn(3, 4, 6))
    new = torch.randn(3, 4, 5) * 100 + 7
    policy.set_layer_features(new)
    flat = policy.layer_features.reshape(-1, 5)  # standardised per feature over the pool
    assert torch.allclose(flat.mean(0), torch.zeros(5), atol=1e-5)
    with pytest.raises(ValueError, match="num_layers=4"):
        PathPolicy(pool_size=3, num_layers=4, n_objectives=2, layer_features=torch.randn(3, 5, 5), config=Level2Config())


def test_stop_is_never_chosen_on_the_empty_path() -> None:
    env, policy = make(knn=13, epsilon=1.0)  # every action a candidate, uniform picks
    obs, _ = env.reset()
    rng = torch.Generator().manual_seed(0)
    actions = {policy.act(obs, deterministic=False, rng=rng)[0] for _ in range(300)}
    assert env.stop_action not in actions and len(actions) == 12
    env.step(0)
    obs = env.observe(env.state, env.lam)
    actions = {policy.act(obs, deterministic=False, rng=rng)[0] for _ in range(300)}
    assert env.stop_action in actions


def test_wolpertinger_picks_the_best_neighbour_by_path_value() -> None:
    env, policy = make(knn=4)
    obs, _ = env.reset()
    env.step(env.hop_action(1, 2))
    obs = env.observe(env.state, env.lam)
    batch = collate([obs])
    with torch.no_grad():
        mu = policy.actor(torch.cat([policy.actor_encoder.encode(batch, policy.layer_features), batch["lam"]], -1))[0]
        table = policy.actor_encoder.action_embeddings(policy.layer_features)
        nearest = torch.topk(((table - mu) ** 2).sum(-1), 4, largest=False).indices
        enc = policy.critic_encoder
        values = []
        for a in nearest.tolist():  # V(S ⊕ A) computed one action at a time, from the full sequence
            hops = [*env.state.hops, divmod(a, 4)] if a != env.stop_action else env.state.hops
            extended = env.observe(type(env.state)(hops=hops), env.lam)
            h = enc.encode(collate([extended]), policy.layer_features)
            if a == env.stop_action:
                h = enc.step(h, enc.stop_token[None])
            values.append(float(policy.path_value(h, batch["lam"])[0]))
    action, _ = policy.act(obs, deterministic=True)
    assert action == nearest[int(np.argmax(values))]
    # knn = 1: the env action is the proto-action's nearest neighbour, whatever the critic says.
    policy.knn = 1
    assert policy.act(obs, deterministic=True)[0] == nearest[0]


@pytest.mark.parametrize("mode", ["hm3", "rmm"])
def test_stored_log_prob_matches_evaluate_and_rng_reproduces(mode: str) -> None:
    env, policy = make(mode)
    obs, _ = env.reset()
    first = policy.act(obs, deterministic=False, rng=torch.Generator().manual_seed(5))
    again = policy.act(obs, deterministic=False, rng=torch.Generator().manual_seed(5))
    assert first[0] == again[0] and np.array_equal(first[1]["sample"], again[1]["sample"])
    action, stored = first
    with torch.no_grad():
        out = policy.evaluate(collate([obs]), torch.as_tensor(np.stack([stored["sample"]])))
    assert float(out["logp"][0]) == pytest.approx(stored["logp"], abs=1e-4)
    assert float(out["value"][0]) == pytest.approx(stored["value"], abs=1e-5)
    assert 0 <= action < env.action_space.n
    if mode == "rmm":
        assert stored["sample"] == action  # the categorical action itself
        logits = policy.actor(policy._rmm_input(collate([obs])))[0]
        assert policy.act(obs, deterministic=True)[0] == int(torch.argmax(logits))
    else:
        assert stored["sample"].shape == (policy.action_dim,)


def test_lambda_enters_actor_and_critic() -> None:
    env, policy = make()
    obs, _ = env.reset()
    other = {**obs, "lam": np.array([0.0, 1.0], dtype=np.float32)}
    with torch.no_grad():
        out_a = policy.evaluate(collate([obs]), torch.zeros(1, policy.action_dim))
        out_b = policy.evaluate(collate([other]), torch.zeros(1, policy.action_dim))
    assert not torch.allclose(out_a["logp"], out_b["logp"])
    assert not torch.allclose(out_a["value"], out_b["value"])


def test_frame_order_prior_starts_on_the_frames_own_layer_order() -> None:
    """With the prior the first greedy path is the frame's layers in order (the level-1 merge itself);
    with T_max above the depth it then stops. Without it, it is not (same seed)."""
    frame_order = tuple((2, layer) for layer in range(4))
    for t_max, expected in ((None, frame_order), (6, frame_order)):
        env, policy = make(path_prior="frame-order", t_max=t_max)
        state = env.blank_state()
        while not state.done:
            env.advance(state, policy.act(env.observe(state, env.lam), deterministic=True)[0])
        assert tuple(state.hops) == expected
    env, policy = make()
    state = env.blank_state()
    while not state.done:
        env.advance(state, policy.act(env.observe(state, env.lam), deterministic=True)[0])
    assert tuple(state.hops) != frame_order


def test_frame_order_prior_codes_a_hops_layer_by_its_offset_from_the_next_layer() -> None:
    _, policy = make(path_prior="frame-order")
    enc, e = policy.actor_encoder, policy.actor_encoder.model_emb.embedding_dim
    after_0 = enc.action_embeddings(policy.layer_features, 0)[:, e : 2 * e]  # the layer part
    after_1 = enc.action_embeddings(policy.layer_features, 1)[:, e : 2 * e]
    for m in range(3):  # hop (m, l) after a path ending at layer 0 is coded like (m, l + 1) after one ending at 1
        for layer in range(3):
            assert torch.equal(after_0[m * 4 + layer], after_1[m * 4 + layer + 1])
    assert not torch.equal(after_0[0], after_0[1])
    # Without the prior a hop's code is its absolute layer, whatever came before.
    _, plain = make()
    table = plain.actor_encoder.action_embeddings(plain.layer_features, 3)
    assert torch.equal(table, plain.actor_encoder.action_embeddings(plain.layer_features, 0))


def test_critic_margin_keeps_the_nearest_action_unless_the_critic_predicts_more() -> None:
    env, policy = make(knn=12)
    env.reset()
    env.step(env.hop_action(1, 2))
    obs = env.observe(env.state, env.lam)
    batch = collate([obs])
    with torch.no_grad():
        mu = policy.proto_mean(batch)[0]
        nearest = int(torch.argmin(((policy.actor_encoder.action_embeddings(policy.layer_features) - mu) ** 2).sum(-1)))
    chosen = policy.act(obs, deterministic=True)[0]
    assert chosen != nearest  # the (random) critic prefers another of the 12 ...
    policy.critic_margin = 1e6
    assert policy.act(obs, deterministic=True)[0] == nearest  # ... but not by a margin of 1e6


def test_path_prior_settings() -> None:
    assert Level2Config().resolved_critic_margin() == 0.0
    assert Level2Config(path_prior="frame-order").resolved_critic_margin() == 0.01
    assert Level2Config(path_prior="frame-order", critic_margin=0.2).resolved_critic_margin() == 0.2
    with pytest.raises(ValueError, match="path_prior 'frame-order' applies to mode 'hm3' only"):
        Level2Config(mode="rmm", path_prior="frame-order")


def test_the_prior_kl_holds_the_mean_and_does_not_pay_for_a_wider_proto_action() -> None:
    """KL to the frame-order prior regularises Δ; were σ differentiated through ½·Σ(Δ/σ)², the penalty
    would shrink as σ grows, so the regulariser meant to keep paths on the frame's order would reward
    noisier proto-actions, i.e. more edits of it."""
    env, policy = make(path_prior="frame-order")
    obs, _ = env.reset()
    with torch.no_grad():
        policy.actor[-1].bias.fill_(0.3)  # Δ ≠ 0
    kl = policy.evaluate(collate([obs]), torch.zeros(1, policy.action_dim))["prior_kl"].sum()
    kl.backward()
    assert float(kl) > 0 and policy.actor[-1].bias.grad.abs().sum() > 0
    assert policy.log_std.grad is None or float(policy.log_std.grad.abs().sum()) == 0.0
