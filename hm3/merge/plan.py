"""Planner: a recipe + checkpoints -> a list of per-tensor jobs with every parameter resolved.

Planning does all validation up front (method, parameter names and ranges,
model compatibility, Fisher files), so a bad recipe fails before a single
tensor is merged or a byte is written. The executors (:mod:`hm3.merge.engine`
for disk, :mod:`hm3.merge.inmemory` for the search loop) only run the jobs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hm3.checkpoint import Checkpoint, check_compatible, layer_index, open_checkpoint
from hm3.checkpoint.hub import resolve_model
from hm3.config import MergeConfig
from hm3.errors import ConfigError
from hm3.merge.methods import MergeMethod, ParamSpec, all_parameter_names, get_method
from hm3.merge.parameters import layer_position, resolve

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DEFAULT_SEED = 0


def parse_dtype(name: str | None, *, key: str) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"'{key}': unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name, depth and every parameter resolved to a number."""

    name: str
    layer: int | None
    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    base: Checkpoint | None
    inputs: list[Checkpoint]  # models fed to the method (non-base for task-vector methods)
    input_refs: list[str]
    jobs: list[TensorJob]
    compute_dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    seed: int
    fisher_files: list[Path] | None = None
    output_config: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.inputs[0]

    def close(self) -> None:
        for ckpt in {id(c): c for c in [self.base, *self.inputs] if c is not None}.values():
            ckpt.close()


def _check_parameter_names(config: MergeConfig, method: MergeMethod) -> None:
    known_here = {p.name for p in (*method.params, *method.model_params)}
    known_anywhere = all_parameter_names()
    places = [("parameters", config.parameters or {})] + [
        (f"models[{i}] ({m.model}).parameters", m.parameters or {}) for i, m in enumerate(config.models)
    ]
    for where, params in places:
        for name in params:
            if name in known_here:
                continue
            if name in known_anywhere:
                log.warning(f"{where}.{name} is not used by merge_method {method.name!r}")
                continue
            raise ConfigError(
                f"unknown parameter '{where}.{name}' for merge_method {method.name!r}; "
                f"known: {', '.join(sorted(known_here))}"
            )


def _resolve_one(config: MergeConfig, spec: ParamSpec, *, tensor: str, t: float, model: str | None) -> Any:
    value = resolve(config, spec.name, tensor_name=tensor, t=t, model=model, default=spec.default)
    where = f"model {model!r}, " if model else ""
    if value is None:
        if spec.required:
            raise ConfigError(f"missing required parameter '{spec.name}' ({where}tensor {tensor})")
        return None
    problem = spec.check(value)
    if problem:
        raise ConfigError(f"parameter '{spec.name}' ({where}tensor {tensor}) {problem}")
    return value


def resolve_jobs(
    config: MergeConfig,
    method: MergeMethod,
    *,
    tensor_names: Sequence[str],
    num_layers: int,
    input_refs: Sequence[str],
) -> list[TensorJob]:
    """Resolve every parameter of every output tensor (pure: no file access).

    Called once per candidate by the search loop, so it stays cheap: a few
    dictionary look-ups per tensor and model.
    """
    jobs = []
    for name in tensor_names:
        layer = layer_index(name)
        t = layer_position(layer, num_layers)
        params = {p.name: _resolve_one(config, p, tensor=name, t=t, model=None) for p in method.params}
        model_params = tuple(
            {p.name: _resolve_one(config, p, tensor=name, t=t, model=ref) for p in method.model_params}
            for ref in input_refs
        )
        for ref, values in zip(input_refs, model_params, strict=True):
            problem = method.check_model(values) if method.check_model is not None else None
            if problem:
                raise ConfigError(f"merge_method {method.name!r}, model {ref!r}, tensor {name}: {problem}")
        jobs.append(TensorJob(name=name, layer=layer, params=params, model_params=model_params))
    if method.name == "linear" and jobs and jobs[0].params.get("normalize"):
        total = sum(float(mp["weight"]) for mp in jobs[0].model_params)
        if abs(total) < 1e-8:
            raise ConfigError("linear with normalize: the model weights sum to 0")
    return jobs


def takes_base(config: MergeConfig, method: MergeMethod) -> bool:
    """Whether ``base_model`` is the method's base (task vectors are taken from it), not one of its inputs."""
    return method.needs_base or (method.optional_base and bool(config.base_model))


def _check_model_count(method: MergeMethod, refs: list[str], *, besides_base: bool) -> None:
    low, high = method.min_models, method.max_models
    if low <= len(refs) and (high is None or len(refs) <= high):
        return
    wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
    where = " besides base_model" if besides_base else ""
    raise ConfigError(
        f"merge_method {method.name!r} merges {wanted} model{'s' if high != 1 else ''}{where}; "
        f"'models' lists {len(refs)}{where}: {', '.join(refs)}"
    )


def input_refs_for(config: MergeConfig, method: MergeMethod) -> list[str]:
    """Which listed models feed the method, in config order (mergekit's semantics)."""
    refs: list[str] = []
    for m in config.models:
        if m.model in refs:
            raise ConfigError(f"model {m.model!r} is listed twice in 'models'")
        refs.append(m.model)
    if takes_base(config, method):
        if not config.base_model:
            raise ConfigError(f"merge_method {method.name!r} needs 'base_model'")
        refs = [r for r in refs if r != config.base_model]
        if not refs:
            raise ConfigError(f"merge_method {method.name!r}: 'models' lists no model besides the base")
    elif config.base_model and config.base_model not in refs:
        raise ConfigError(
            f"merge_method {method.name!r} merges the listed models; base_model {config.base_model!r} "
            "must be one of them or be omitted"
        )
    _check_model_count(method, refs, besides_base=takes_base(config, method))
    return refs


def _fisher_files(config: MergeConfig, method: MergeMethod, refs: list[str], config_dir: Path | None):
    paths: list[str | None] = []
    for ref in refs:
        m = next(m for m in config.models if m.model == ref)
        paths.append((m.parameters or {}).get("fisher"))  # a plain path, no gradient/filter
    given = [p for p in paths if p is not None]
    if not given:
        if method.requires_fisher:
            raise ConfigError(f"merge_method {method.name!r} needs a 'fisher' file for every model")
        return None
    if not method.supports_fisher:
        raise ConfigError(f"merge_method {method.name!r} does not take 'fisher' parameters")
    if len(given) != len(paths):
        missing = [r for r, p in zip(refs, paths, strict=True) if p is None]
        raise ConfigError(f"'fisher' is given for some models but not for {', '.join(missing)}: give all or none")
    out = []
    for ref, p in zip(refs, paths, strict=True):
        if not isinstance(p, str):
            raise ConfigError(f"model {ref!r}: 'fisher' must be a path to a safetensors file, got {p!r}")
        path = Path(p) if Path(p).exists() or config_dir is None else config_dir / p
        if not path.is_file():
            raise ConfigError(f"model {ref!r}: Fisher file not found: {p}")
        out.append(path)
    return out


def dare_generator(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """A generator seeded by (seed, tensor, model): DARE masks independent of execution order."""
    digest = hashlib.sha256(f"{seed}/{tensor_name}/{model_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def plan_merge(config: MergeConfig, *, config_dir: Path | None = None, seed: int | None = None) -> MergePlan:
    """Validate ``config`` against its models (local directories, or hub ids through the HF cache:
    :mod:`hm3.checkpoint.hub`) and resolve every tensor's job."""
    method = get_method(config.merge_method)
    _check_parameter_names(config, method)
    compute_dtype = parse_dtype(config.dtype, key="dtype")
    out_dtype = parse_dtype(config.out_dtype, key="out_dtype") or compute_dtype
    refs = input_refs_for(config, method)
    if config.tokenizer_source not in (None, "base") and config.tokenizer_source != config.base_model:
        raise ConfigError(
            f"tokenizer_source {config.tokenizer_source!r} is not supported: hm3 copies the base model's "
            "tokenizer (use 'base' or omit it)"
        )
    fisher_files = _fisher_files(config, method, refs, config_dir)
    opened: list[Checkpoint] = []
    try:
        base = None
        if takes_base(config, method):
            base = open_checkpoint(resolve_model(config.base_model, config_dir))
            opened.append(base)
        inputs = []
        for ref in refs:
            inputs.append(open_checkpoint(resolve_model(ref, config_dir)))
            opened.append(inputs[-1])
        check_compatible(opened)
        reference = opened[0]
        jobs = resolve_jobs(
            config,
            method,
            tensor_names=reference.tensor_names(),
            num_layers=reference.num_layers,
            input_refs=refs,
        )
    except BaseException:
        for c in opened:
            c.close()
        raise
    output_config = dict(reference.config)
    if out_dtype is not None:
        output_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    return MergePlan(
        config=config,
        method=method,
        base=base,
        inputs=inputs,
        input_refs=refs,
        jobs=jobs,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
        seed=seed if seed is not None else (config.seed if config.seed is not None else DEFAULT_SEED),
        fisher_files=fisher_files,
        output_config=output_config,
    )
