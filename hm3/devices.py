"""Devices and dtypes by name, as flags and configs give them, resolved against this machine.

``--device`` (``hm3 merge``) and ``evaluation.device`` (run configs) take ``cpu``, ``cuda`` or
``cuda:N``; the config also takes ``auto`` (cuda where torch finds a GPU, else cpu) so that one
config runs on a laptop and on a GPU machine. ``evaluation.dtype`` takes ``float32``, ``bfloat16``,
``float16`` or ``auto`` (bfloat16 on cuda, float32 on cpu: CPUs without bfloat16 kernels emulate it
slowly, GPUs run it at twice float32's speed in half the memory).

A device this machine lacks is refused here, naming the key and value, before any model is loaded:
torch's own errors surface later as a RuntimeError or an AssertionError deep inside a merge.
"""

from __future__ import annotations

import re

import torch

from hm3.errors import ConfigError, DeviceError

DEVICE_NAMES = re.compile(r"^(cpu|cuda(:\d+)?)$")
EVALUATION_DEVICES = "cpu, cuda, cuda:N or auto"
EVALUATION_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def check_device(device: str | torch.device, *, key: str = "--device") -> torch.device:
    """``device`` as torch's, refused (naming ``key``) where this machine or torch build cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{key} {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"{key} {device!r}: hm3 runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else "finds no usable GPU"
        raise DeviceError(f"{key} {device!r}: CUDA is not available (this torch, {torch.__version__}, {build}); "
                          "use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"{key} {device!r}: only {torch.cuda.device_count()} GPU(s) here (cuda:0 ..)")
    return dev


def resolve_device(name: str, *, key: str) -> torch.device:
    """A config's device: ``auto`` is cuda where available, else cpu; anything else as :func:`check_device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, key=key)


def resolve_dtype(name: str, device: torch.device, *, key: str) -> torch.dtype:
    """A config's dtype on ``device``: ``auto`` is bfloat16 on cuda, float32 on cpu."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return EVALUATION_DTYPES[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown dtype {name!r}; use one of {', '.join(EVALUATION_DTYPES)} or auto") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` as ``"bfloat16"`` (how configs, logs and summaries spell it)."""
    return str(dtype).removeprefix("torch.")
