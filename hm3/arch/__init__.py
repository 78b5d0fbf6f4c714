"""Level 2, the architecture level: layer paths over a pool of models (and, later, the RL search over them)."""

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
