"""Checkpoint I/O: lazy reading of Hugging Face model directories and atomic, sharded writing.

The synthetic tiny-model builders live in :mod:`hm3.checkpoint.synthetic` (imported on demand,
as they pull in transformers).
"""

from hm3.checkpoint.layers import layer_index, layer_tensor_names, rename_layer
from hm3.checkpoint.reader import (
    Checkpoint,
    SafetensorsFile,
    TensorInfo,
    check_compatible,
    check_finite,
    open_checkpoint,
    read_safetensors_header,
)
from hm3.checkpoint.writer import CheckpointWriter, StagedDirectory, config_with_dtype

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "SafetensorsFile",
    "StagedDirectory",
    "TensorInfo",
    "check_compatible",
    "check_finite",
    "config_with_dtype",
    "layer_index",
    "layer_tensor_names",
    "open_checkpoint",
    "read_safetensors_header",
    "rename_layer",
]
