"""Level 2, the architecture level: layer paths over a pool of models and the RL search over them.

Modules: ``path`` (a path over a layer pool, in memory and on disk; transition scales),
``swaps`` (layer swaps, the structured family of paths), ``env`` (the gymnasium environment, HM3
and RMM modes, DAR rewards), ``policy`` (λ-conditioned actor/critic), ``ppo`` (the trainer), ``rl_config`` (its settings), ``pools``
(layer pools over a session's models and their layer summaries), ``level2`` (path scoring through an
evaluation session, with DAR rewards). Only the path API is re-exported here, so importing it does
not pull in gymnasium.
"""

from hm3.arch.path import (
    LayerPath,
    LayerPool,
    branch_scales_from_input_scales,
    build_path_model,
    export_path,
    mergekit_passthrough_config,
)

__all__ = [
    "LayerPath",
    "LayerPool",
    "branch_scales_from_input_scales",
    "build_path_model",
    "export_path",
    "mergekit_passthrough_config",
]
