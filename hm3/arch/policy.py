"""λ-conditioned actor and critic for the level-2 search (HM3's Wolpertinger policy, or RMM's categorical one).

**hm3 mode.** A hop (m, l) is embedded as ``e(m, l) = [emb(m); emb(l); W·φ(θ_{m,l})]`` (three
``embed_dim`` parts; φ = a summary of the layer's weights given by the driver, standardised per
feature over the pool). A GRU runs over the hops so far; its last state h (zeros for the empty path)
joined with λ feeds three tanh MLP heads:

* actor: the mean μ of a Gaussian *proto-action* in the same space as the hop embeddings (a
  learned, state-free log std). The discrete actions live there too: hop (m, l) at e(m, l), STOP
  at a learned vector -- so the nearest actions to a proto-action are hops whose model, depth and
  weights resemble it (Wolpertinger's premise);
* value: V(s), PPO's critic for GAE on the per-step rewards;
* path value: Q(s) ≈ E[R | the path s], the expected *final* raw reward of a path prefix (or, with
  STOP appended, of a complete path). [design] Wolpertinger picks among the M′ nearest actions the
  one maximising ``V(S ⊕ A)``; with HM3's reward spread as R/T per step, the PPO critic's value of
  a successor is a reward-to-go that shrinks with depth and is 0 after STOP, so it cannot rank STOP
  against a further hop. The path-value head answers "how good is the path after this action",
  which can. It predicts the *vector* of expected scores f̂ and the expected length T̂ and
  combines them as ``λ·f̂ − β1·T̂`` (R is linear in λ, so one set of score predictions serves every
  preference -- the vector-valued critics of multi-objective RL); it is trained by regression on
  each episode's raw scores and length (see :mod:`hm3.arch.ppo`), so DAR's smoothing, made for
  the scalar reward, does not enter it: regression averages the subset noise by itself.

Acting: sample proto ``a ~ N(μ, σ)`` (``a = μ`` when deterministic), take the M′ = ``knn`` nearest
valid actions (STOP invalid on the empty path), pick the best by path value, or with probability ε
(exploring only) a uniform one of the M′. PPO's log-prob and entropy are the Gaussian's at ``a``.
The critic's pick replaces the nearest action only when its path value is higher by more than
``critic_margin`` (0 by default: the paper's plain argmax, ties to the nearest).

**The frame-order prior** (``path_prior: frame-order``, [design]). On a deep model almost every
path over "any model, any layer" computes nothing, every reward is 0 and PPO has no gradient
(docs/LEVEL2.md). With the prior, a hop's layer part is coded by its *offset* from the next layer
in order, ``emb(l − n)`` with n = the previous hop's layer + 1 (0 for the first hop), so "carry on
in order" is one point of the space at every depth and what the critic learns about it carries
across depths; the offset table starts as a random walk, so small offsets start near offset 0.
The actor's mean is ``μ = e(frame, n) + Δ(h, λ)`` with Δ's last layer zero at start, and the
path-value head's last layer starts at zero too, so an untrained critic ties everywhere and the
nearest action is taken: the first greedy path is the frame's own layer order, i.e. the level-1
merge, and ε-exploration and learning edit it from there. A shift of Δ moves the proto-action at
every depth at once, so PPO's loss adds ``prior_kl`` × KL(π ‖ prior) = ½·Σ(Δ/σ)², the prior being
the Gaussian at e(frame, n) (RLHF's KL to a reference policy): without it, the first updates'
noisy gradients carried a 12-layer toy's whole path off the order (every layer skipped).

**rmm mode.** RMM's actor-critic: 64-64 tanh MLPs over ``[counts flattened; position one-hot; λ]``
with a categorical actor over Discrete(P + 2). The layer features are accepted (same interface)
and unused: RMM's state is the count matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hm3.arch.rl_config import Level2Config

OBS_KEYS_HM3 = ("lam", "models", "layers", "length")
OBS_KEYS_RMM = ("lam", "counts", "position")


def mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    """Two tanh hidden layers (RMM's 64-64 shape), a linear output."""
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_out)
    )


def collate(observations: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack env observations into batch tensors (ints stay int64, the rest float32)."""
    out = {}
    for key in observations[0]:
        arr = np.stack([np.asarray(o[key]) for o in observations])
        dtype = torch.int64 if np.issubdtype(arr.dtype, np.integer) else torch.float32
        out[key] = torch.as_tensor(arr, dtype=dtype)
    return out


def standardise_features(features: torch.Tensor) -> torch.Tensor:
    """Per-feature z-scores over all pool layers, so φ's units (norms, ranks...) do not set the scale."""
    flat = features.reshape(-1, features.shape[-1]).float()
    std = flat.std(dim=0, unbiased=False)
    z = (flat - flat.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    return z.reshape(features.shape)


def next_layers(obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next layer in order after each observed path, [B]: its last hop's layer + 1 (0 if empty)."""
    length = obs["length"]
    last = obs["layers"][torch.arange(len(length)), (length - 1).clamp(min=0)]
    return torch.where(length > 0, last + 1, torch.zeros_like(last))


class PathEncoder(nn.Module):
    """Hop embeddings ``[emb(m); emb(l); W·φ(m, l)]``, a learned STOP token and a GRU over a path's hops.

    The actor and the critic each own one (RMM's actor and critic are separate networks too): the
    critic's path values then do not move with the noisy proto-action gradients, and the actor's
    hop embeddings -- the space where the proto-action's neighbours are looked up -- are its own.
    With ``relative`` (the frame-order prior) the layer part is ``emb(l − n)``, n the next layer in
    order, so a hop's embedding depends on the path before it.
    """

    def __init__(self, pool_size: int, num_layers: int, n_features: int, config: Level2Config):
        super().__init__()
        e = config.embed_dim
        self.pool_size, self.num_layers = pool_size, num_layers
        self.relative = config.path_prior == "frame-order"
        self.token_dim = 3 * e
        self.model_emb = nn.Embedding(pool_size, e)
        # relative: offsets l − n in [−L, L − 1] at rows 0 .. 2L − 1 (offset 0 at row L).
        self.layer_emb = nn.Embedding(2 * num_layers if self.relative else num_layers, e)
        self.feature_proj = nn.Linear(n_features, e)
        if self.relative:
            self._init_frame_order_geometry()
        self.stop_token = nn.Parameter(torch.randn(self.token_dim))
        self.gru = nn.GRU(self.token_dim, config.gru_hidden, batch_first=True)

    def _init_frame_order_geometry(self) -> None:
        """Start the action space so that the proto-action's nearest neighbours are small edits.

        [design] Squared distances from a hop at offset 0: another model at the same depth ≈ 5
        (2·e·0.4²), the same model one layer off ≈ 8 (e·0.7², a step of the offsets' random walk),
        further offsets further; φ's projection is scaled down (×0.2) so that the large differences
        between models' weight summaries do not push the other models' same-depth layers out of
        the M′ nearest. With the proto-action's initial σ = 0.5 a neighbour at squared distance d²
        wins by noise alone with probability Φ(−d/(2σ)) ≈ 1% for a swap of model: on a 30-hop path
        that leaves about one edit per path, rather than the several a random geometry gives.
        """
        n, e = self.num_layers, self.model_emb.embedding_dim
        with torch.no_grad():
            self.model_emb.weight.mul_(0.4)
            walk = torch.randn(2 * n, e).mul_(0.7).cumsum(0)
            self.layer_emb.weight.copy_(walk - walk[n])  # offset 0 (row n) at the origin
            self.feature_proj.weight.mul_(0.2)
            self.feature_proj.bias.mul_(0.2)

    def hop_embedding(
        self, models: torch.Tensor, layers: torch.Tensor, features: torch.Tensor, nexts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """e(m, l) for index tensors of any shape; ``features`` is φ, [P, L, F]; ``nexts`` (same shape,
        relative coding only) the next layer in order before each hop."""
        phi = self.feature_proj(features[models, layers])
        codes = layers
        if self.relative:
            if nexts is None:
                raise ValueError("relative hop coding needs the next layer in order before each hop")
            codes = (layers - nexts + self.num_layers).clamp(0, 2 * self.num_layers - 1)
        return torch.cat([self.model_emb(models), self.layer_emb(codes), phi], dim=-1)

    def action_embeddings(self, features: torch.Tensor, next_layer: int = 0) -> torch.Tensor:
        """[P·L + 1, D]: hop (m, l) at row m·L + l, STOP last (the env's action order), as hops after a
        path whose next layer in order is ``next_layer`` (relative coding; ignored otherwise)."""
        m = torch.arange(self.pool_size).repeat_interleave(self.num_layers)
        layer = torch.arange(self.num_layers).repeat(self.pool_size)
        hops = self.hop_embedding(m, layer, features, torch.full_like(layer, next_layer))
        return torch.cat([hops, self.stop_token[None]], dim=0)

    def encode(self, obs: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """GRU state after the hops so far, [B, hidden] (zeros for an empty path)."""
        models, layers, length = obs["models"], obs["layers"], obs["length"]
        # Before hop t the next layer in order is hop t−1's layer + 1 (0 before the first hop).
        nexts = torch.cat([torch.zeros_like(layers[:, :1]), layers[:, :-1].clamp(min=-1) + 1], dim=1)
        out, _ = self.gru(self.hop_embedding(models.clamp(min=0), layers.clamp(min=0), features, nexts))
        last = out[torch.arange(len(length)), (length - 1).clamp(min=0)]
        return torch.where((length > 0)[:, None], last, torch.zeros_like(last))

    def step(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One GRU step from states h [B, hidden] on tokens [B, D]: the state of S ⊕ A."""
        out, _ = self.gru(tokens[:, None, :], h[None].contiguous())
        return out[:, 0]


class PathPolicy(nn.Module):
    """λ-conditioned actor and critics over layer paths (module docstring)."""

    def __init__(
        self,
        *,
        pool_size: int,
        num_layers: int,
        n_objectives: int,
        layer_features: torch.Tensor,
        config: Level2Config,
    ):
        super().__init__()
        self.mode = config.mode
        self.pool_size, self.num_layers, self.n_objectives = pool_size, num_layers, n_objectives
        self.knn, self.epsilon = config.knn, config.epsilon
        self.critic_margin = config.resolved_critic_margin()
        self.prior = config.path_prior == "frame-order"
        self.frame = pool_size - 1  # the pool's last model frames every path (hm3.arch.level2)
        self.t_max = config.resolved_t_max(num_layers)
        if layer_features.ndim != 3 or tuple(layer_features.shape[:2]) != (pool_size, num_layers):
            raise ValueError(
                f"layer_features has shape {list(layer_features.shape)}; expected [pool_size={pool_size}, "
                f"num_layers={num_layers}, F]"
            )
        self.register_buffer("layer_features", standardise_features(layer_features))
        hidden = config.mlp_hidden
        if self.mode == "rmm":
            n_in = num_layers * pool_size + num_layers + 1 + n_objectives
            self.actor = mlp(n_in, pool_size + 2, hidden)
            self.value_head = mlp(n_in, 1, hidden)
            return
        self.actor_encoder = PathEncoder(pool_size, num_layers, layer_features.shape[-1], config)
        self.critic_encoder = PathEncoder(pool_size, num_layers, layer_features.shape[-1], config)
        self.action_dim = self.actor_encoder.token_dim
        n_in = config.gru_hidden + n_objectives
        self.actor = mlp(n_in, self.action_dim, hidden)
        self.value_head = mlp(n_in, 1, hidden)
        self.path_value_head = mlp(n_in, n_objectives + 1, hidden)
        self.beta1 = config.beta1
        self.log_std = nn.Parameter(torch.full((self.action_dim,), math.log(config.proto_std_init)))
        if self.prior:  # Δ = 0 and a flat critic at start (module docstring)
            for head in (self.actor, self.path_value_head):
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's own parameters (its encoder and both value heads), trained at ``lr_value``."""
        modules = [self.value_head] if self.mode == "rmm" else [self.critic_encoder, self.value_head, self.path_value_head]
        return [p for m in modules for p in m.parameters()]

    def set_layer_features(self, features: torch.Tensor) -> None:
        """Replace φ (e.g. after the pool's merge changed); the shape must match the current one."""
        if tuple(features.shape) != tuple(self.layer_features.shape):
            raise ValueError(
                f"new layer features have shape {list(features.shape)}, "
                f"the policy was built for {list(self.layer_features.shape)}"
            )
        self.layer_features.copy_(standardise_features(features))

    # --- hm3 critic pieces --------------------------------------------------------------------------
    def path_outcome(self, h: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Expected outcome of the path whose critic GRU state is h: [B, K + 1] = scores f̂, then T̂ / T_max."""
        return self.path_value_head(torch.cat([h, lam], dim=-1))

    def path_value(self, h: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Expected final raw reward ``λ·f̂ − β1·T̂`` of the path whose critic GRU state is h, [B]."""
        out = self.path_outcome(h, lam)
        return (lam * out[:, :-1]).sum(-1) - self.beta1 * self.t_max * out[:, -1]

    def complete_path_outcome(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`path_outcome` of each observed path with STOP appended (the path as scored)."""
        enc = self.critic_encoder
        h = enc.encode(obs, self.layer_features)
        return self.path_outcome(enc.step(h, enc.stop_token.expand(len(h), -1)), obs["lam"])

    # --- acting and evaluation ----------------------------------------------------------------------
    def proto_mean(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """μ of the proto-action for each observed state, [B, D] (Δ + the frame's next hop with the prior)."""
        return self._anchored(obs, self._proto_delta(obs))

    def _anchored(self, obs: dict[str, torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
        """μ from the actor's output Δ: Δ itself, or Δ + e(frame, n) with the prior."""
        return delta + self._prior_anchor(obs) if self.prior else delta

    def _proto_delta(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.actor_encoder.encode(obs, self.layer_features)
        return self.actor(torch.cat([h, obs["lam"]], dim=-1))

    def _prior_anchor(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """e(frame, n) for each state's next layer n (STOP after the last layer), a fixed origin: the
        embeddings learn through the GRU, not by being pulled toward the proto-actions."""
        enc = self.actor_encoder
        nexts = next_layers(obs)
        frame = torch.full_like(nexts, self.frame)
        anchor = enc.hop_embedding(frame, nexts.clamp(max=self.num_layers - 1), self.layer_features, nexts)
        # After the last layer the frame's order ends: STOP.
        anchor = torch.where((nexts >= self.num_layers)[:, None], enc.stop_token.expand_as(anchor), anchor)
        return anchor.detach()

    def act(
        self, obs: dict[str, Any], *, deterministic: bool, rng: torch.Generator | None = None
    ) -> tuple[int, dict[str, Any]]:
        """The env action for one observation, and what PPO stores: ``sample`` (proto-action or the
        categorical action), ``logp``, ``value``; ``rng`` makes exploration reproducible."""
        batch = collate([obs])
        with torch.no_grad():
            if self.mode == "rmm":
                logits = self.actor(self._rmm_input(batch))[0]
                if deterministic:
                    action = int(torch.argmax(logits))
                else:
                    action = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng))
                logp = float(torch.log_softmax(logits, -1)[action])
                value = float(self.value_head(self._rmm_input(batch))[0, 0])
                return action, {"sample": np.int64(action), "logp": logp, "value": value}
            mu, std = self.proto_mean(batch)[0], self.log_std.exp()
            proto = mu if deterministic else mu + std * torch.randn(mu.shape, generator=rng)
            action = self._wolpertinger(batch, proto, explore=not deterministic, rng=rng)
            logp = float(torch.distributions.Normal(mu, std).log_prob(proto).sum())
            h_critic = self.critic_encoder.encode(batch, self.layer_features)
            value = float(self.value_head(torch.cat([h_critic, batch["lam"]], dim=-1))[0, 0])
        return action, {"sample": proto.numpy().astype(np.float32), "logp": logp, "value": value}

    def _wolpertinger(
        self, batch: dict[str, torch.Tensor], proto: torch.Tensor, *, explore: bool, rng: torch.Generator | None
    ) -> int:
        """The M′ nearest valid actions to ``proto``; the best by path value (or, with ε, a random one)."""
        next_layer = int(next_layers(batch)[0])
        table = self.actor_encoder.action_embeddings(self.layer_features, next_layer)
        dist = ((table - proto) ** 2).sum(-1)
        length = int(batch["length"][0])
        stop = len(table) - 1
        if length == 0:
            dist[stop] = math.inf
        k = min(self.knn, len(table) - (1 if length == 0 else 0))
        candidates = torch.topk(dist, k, largest=False).indices
        if explore and self.epsilon > 0 and float(torch.rand((), generator=rng)) < self.epsilon:
            return int(candidates[int(torch.randint(k, (), generator=rng))])
        # V(S ⊕ A): the critic's GRU advanced by each candidate's token (its own embedding of the action).
        enc = self.critic_encoder
        h = enc.encode(batch, self.layer_features).expand(k, -1)
        after = enc.step(h, enc.action_embeddings(self.layer_features, next_layer)[candidates])
        # A hop that fills the path to T_max completes it: value it as the scored path (STOP appended).
        full = (candidates != stop) & (length + 1 >= self.t_max)
        if bool(full.any()):
            closed = enc.step(after, enc.stop_token.expand(k, -1))
            after = torch.where(full[:, None], closed, after)
        values = self.path_value(after, batch["lam"].expand(k, -1))
        best = int(torch.argmax(values))
        # candidates[0] is the nearest: the critic overrides it only by more than the margin.
        return int(candidates[best if float(values[best] - values[0]) > self.critic_margin else 0])

    def evaluate(self, obs: dict[str, torch.Tensor], samples: torch.Tensor) -> dict[str, torch.Tensor]:
        """For a batch of states and stored samples: ``logp``, ``entropy``, ``value`` (and, hm3,
        ``path_outcome`` [B, K + 1] of each state's path prefix and ``prior_kl``), with gradients."""
        if self.mode == "rmm":
            x = self._rmm_input(obs)
            dist = torch.distributions.Categorical(logits=self.actor(x))
            return {"logp": dist.log_prob(samples), "entropy": dist.entropy(), "value": self.value_head(x)[:, 0]}
        delta, std = self._proto_delta(obs), self.log_std.exp()
        dist = torch.distributions.Normal(self._anchored(obs, delta), std)
        h_critic = self.critic_encoder.encode(obs, self.layer_features)
        # KL(π ‖ prior) of the proto-action, the prior being N(e(frame, n), σ): ½·Σ(Δ/σ)² (0 without it).
        # σ is the prior's as well as π's, so it is held fixed here: differentiated, the penalty would fall
        # as σ grows and pay the policy for noisier proto-actions, i.e. more edits of the frame's order.
        prior_kl = 0.5 * (delta / std.detach()).pow(2).sum(-1) if self.prior else torch.zeros(len(delta))
        return {
            "prior_kl": prior_kl,
            "logp": dist.log_prob(samples).sum(-1),
            "entropy": dist.entropy().sum(-1),
            "value": self.value_head(torch.cat([h_critic, obs["lam"]], dim=-1))[:, 0],
            "path_outcome": self.path_outcome(h_critic, obs["lam"]),
        }

    def _rmm_input(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([obs["counts"].flatten(1), obs["position"], obs["lam"]], dim=-1)
