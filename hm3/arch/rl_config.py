"""Settings of the level-2 search (layer paths found by RL), one frozen pydantic model.

Every value the papers leave open is a field here with its default and where that default
comes from: **[HM3]** / **[RMM]** the paper or its code, **[design]** this project's choice.
The model is frozen so a run can store it and refuse a resume under different settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hm3.config_model import FiniteConfigModel


class Level2Config(FiniteConfigModel):
    """Environment, networks and PPO of the architecture-level search."""

    mode: Literal["hm3", "rmm"] = Field(
        "hm3",
        description="hm3: any (model, layer) hop, Gaussian proto-action + Wolpertinger [HM3]; "
        "rmm: take/skip/back over block positions with a categorical policy [RMM]",
    )
    # --- environment -------------------------------------------------------------------------------
    t_max: int | None = Field(
        None,
        description="HM3 maximum path length T_max (not given by the paper) [design]; None means the layer "
        "count of the pool models. RMM ignores it",
    )
    beta1: float = Field(0.01, ge=0, description="HM3 length penalty β1 per hop on normalised scores [design]")
    rmm_back_penalty: float = Field(
        -0.1,
        description="RMM reward for backing past block 0 (or ending with an empty path, in either mode: "
        "hm3's STOP before any hop too): RMM's code gives -10 "
        "on its 0-100 accuracy scale; hm3's rewards are normalised scores (base 0, best expert 1), so -0.1 is "
        "the same penalty [design]",
    )
    rmm_max_steps: int | None = Field(
        None,
        ge=1,
        description="RMM step cap so skip/back loops end [design]; None means 3 × the layer count",
    )
    transition_scales: tuple[float, ...] | None = Field(
        None,
        description="Sakana's transition scales as a level-2 parameter searched per path [design]: each episode's "
        "path is scored plain and with the hidden state entering every switch between models multiplied by each "
        "value w of this grid (folded into exact branch scales, hm3.arch.path.with_switch_scales), all on the "
        "same reward subset; the best by raw reward is the episode's path and reward. Costs one more evaluation "
        "per value for a path that switches models (none for one that does not). None (default): paths are "
        "unscaled. Refused for architectures where scales are not exact (hm3.checkpoint.layers.SCALABLE_MODEL_TYPES). "
        "Sakana found paths without their transition scaling more than 20% worse; e.g. [0.7, 1.4]",
    )
    # --- Dynamic Average Reward --------------------------------------------------------------------
    dar: bool = Field(True, description="smooth terminal rewards with RMM's Dynamic Average Reward [RMM]")
    data_scale: float = Field(
        0.1, gt=0, le=1, description="DAR data scale s: fraction of the split per evaluation [RMM code: 0.1]"
    )
    dar_alpha: float = Field(0.8, ge=0, lt=1, description="DAR α in a_i = α·i/N [RMM code: 0.8]")
    offline_episodes: int = Field(
        1000,
        ge=1,
        description="planned offline pretraining episodes (λ ~ Dirichlet(1) per episode); DAR's N offline "
        "[HM3: Max_iter = 1000]",
    )
    online_episodes: int = Field(
        100, ge=1, description="planned online fine-tuning episodes for one requested λ; DAR's N online [design]"
    )
    # --- networks ----------------------------------------------------------------------------------
    gru_hidden: int = Field(64, ge=1, description="GRU state size of the path encoder [design]")
    embed_dim: int = Field(
        16, ge=1, description="size of each part of a hop embedding [emb(m); emb(l); proj φ] [design]"
    )
    mlp_hidden: int = Field(
        64, ge=1, description="width of the two tanh layers of every head [RMM code: 64-64 tanh]"
    )
    knn: int = Field(8, ge=1, description="Wolpertinger M′: nearest discrete actions to the proto-action [design]")
    epsilon: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Wolpertinger ε: chance of a uniform pick among the M′ when exploring [design: on a 3×3 "
        "toy with a known optimum, 0.2 found it more reliably than 0.1]",
    )
    path_prior: Literal["none", "frame-order"] = Field(
        "none",
        description="hm3 mode only. none: HM3 as published, hop (m, l) coded by its absolute layer l. "
        "frame-order: a hop's layer is coded by its offset from the next layer in order (the previous "
        "hop's layer + 1), the proto-action starts at the frame's own next layer, and an untrained critic "
        "defers to the nearest action, so the first paths are the frame's layer order (the level-1 merge "
        "itself) and exploration edits it. For deep models, where a random path over any model and any "
        "layer almost never computes anything (docs/LEVEL2.md); there keep ε·T_max small (e.g. epsilon "
        "0.03-0.05 for 30 layers): each ε-pick may edit the path [design]",
    )
    prior_kl: float = Field(
        1.0,
        ge=0,
        description="frame-order only: weight of KL(π ‖ prior) = ½·Σ(Δ/σ)² in PPO's loss, the prior being the "
        "proto-action's Gaussian at the frame's next hop, so the policy leaves the frame's order where "
        "advantages agree, not on one update's noise [design]",
    )
    critic_margin: float | None = Field(
        None,
        ge=0,
        description="Wolpertinger: the critic overrides the proto-action's nearest action only when it predicts "
        "a path value (normalised score units) higher by more than this [design]; None means 0 with "
        "path_prior none (the paper's argmax) and 0.01 with frame-order. A deep path breaks at a few bad hops, "
        "so a barely trained critic must not take the actor off the frame's order on a whim, while a large "
        "margin also blocks the small gains of single-hop edits. After only a few episodes the critic is barely "
        "trained: for budgets of tens of episodes prefer 0.05 (docs/LEVEL2.md)",
    )
    proto_std_init: float = Field(
        0.5, gt=0, description="initial std of the Gaussian proto-action (a learned, state-free log std) [design]"
    )
    # --- PPO ---------------------------------------------------------------------------------------
    gamma: float = Field(0.99, ge=0, le=1, description="discount γ [HM3, RMM: 0.99]")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE λ [design]; 1.0 gives RMM's Monte-Carlo returns")
    clip: float = Field(0.2, gt=0, description="PPO clip ε [RMM code: 0.2]")
    c1: float = Field(0.5, ge=0, description="value-loss coefficient c1 [design; RMM code: 0.5]")
    c2: float = Field(0.01, ge=0, description="entropy-bonus coefficient c2 [design; RMM code: 1e-4]")
    lr_policy: float = Field(3e-4, gt=0, description="Adam lr of the actor and the shared encoder [RMM code]")
    lr_value: float = Field(1e-3, gt=0, description="Adam lr of the critic heads [RMM code]")
    epochs: int = Field(10, ge=1, description="PPO epochs per update, full batch [design; RMM code: 40]")
    episodes_per_update: int = Field(8, ge=1, description="episodes collected per PPO update [design; RMM: 4]; the "
                                     "episodes that end a stage are learned from in a smaller last batch (RMM's code "
                                     "drops them)")
    max_grad_norm: float = Field(0.5, gt=0, description="gradient-norm clip per step [design]")
    normalize_advantages: bool = Field(
        True,
        description="standardise advantages over each update's batch [design]; RMM's code instead standardises the "
        "Monte-Carlo returns and fits its critic to them, so its advantages are normalised returns minus V",
    )

    @field_validator("t_max")
    @classmethod
    def _t_max_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"t_max must be >= 1, got {value}")
        return value

    @field_validator("transition_scales")
    @classmethod
    def _scales_positive(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (not value or any(not (0 < w < float("inf")) for w in value)):
            raise ValueError(f"transition_scales must be a non-empty list of finite positive values, got {value}")
        return value

    @model_validator(mode="after")
    def _prior_needs_hm3_mode(self) -> Level2Config:
        if self.path_prior != "none" and self.mode != "hm3":
            raise ValueError(f"path_prior {self.path_prior!r} applies to mode 'hm3' only, not {self.mode!r}")
        return self

    @classmethod
    def rmm_defaults(cls, **overrides: object) -> Level2Config:
        """RMM's published settings: 4 episodes per update, 40 epochs, entropy 1e-4, MC returns (standardised
        advantages rather than RMM's standardised returns, ``normalize_advantages``)."""
        values: dict[str, object] = {
            "mode": "rmm",
            "episodes_per_update": 4,
            "epochs": 40,
            "c2": 1e-4,
            "gae_lambda": 1.0,
        }
        values.update(overrides)
        return cls(**values)

    def resolved_t_max(self, num_layers: int) -> int:
        """T_max for a pool whose models have ``num_layers`` layers."""
        return self.t_max if self.t_max is not None else num_layers

    def resolved_rmm_max_steps(self, num_layers: int) -> int:
        """RMM's step cap for a pool whose models have ``num_layers`` layers."""
        return self.rmm_max_steps if self.rmm_max_steps is not None else 3 * num_layers

    def max_path_hops(self, num_layers: int) -> int:
        """The longest path an episode can build over models of ``num_layers`` layers: T_max (hm3), or
        (rmm) the most blocks its step cap S allows. RMM's back move re-takes blocks, so that can exceed
        the depth: walking to the last block and repeating (back, take) adds one hop per two steps,
        ``L + (S − L) // 2`` for S ≥ L (min(S, L) when S ≤ L or L = 1, where a back from block 0 ends it)."""
        if self.mode == "hm3":
            return self.resolved_t_max(num_layers)
        steps = self.resolved_rmm_max_steps(num_layers)
        if steps <= num_layers or num_layers < 2:
            return min(steps, num_layers)
        return num_layers + (steps - num_layers) // 2

    def resolved_critic_margin(self) -> float:
        """Wolpertinger's critic margin (see ``critic_margin``)."""
        if self.critic_margin is not None:
            return self.critic_margin
        return 0.01 if self.path_prior == "frame-order" else 0.0
