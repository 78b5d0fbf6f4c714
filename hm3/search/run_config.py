"""The run config of a search (``hm3 search param CONFIG.yml RUN_DIR``).

A frozen pydantic model, validated completely before any evaluation starts:
unknown keys, unknown optimisers, reversed bounds, budgets below the initial
design, objectives that cannot be resolved and preference vectors of the wrong
shape are all reported up front. The same object is stored in the run store,
so a resume with a different config is refused with the difference named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from hm3.config import read_yaml_file
from hm3.config_model import FiniteConfigModel
from hm3.devices import DEVICE_NAMES, EVALUATION_DEVICES, resolve_device, resolve_dtype
from hm3.errors import ConfigError, invalid_config
from hm3.search.space import SearchSpace


class VLLMEngineConfig(FiniteConfigModel):
    """Settings of the vLLM engine (``vllm.LLM``), for ``backend: vllm``; None leaves vLLM's default."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is split over")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of each GPU's memory vLLM claims (None: vLLM's 0.9)"
    )
    max_model_len: int | None = Field(None, ge=1, description="context length (None: the model's own)")


class WorkerResources(FiniteConfigModel):
    """What one Ray worker reserves (``evaluation.resources_per_worker``); Ray places workers by these."""

    num_cpus: float = Field(1, ge=0, description="CPU cores per worker (its torch threads: as many, at least 1)")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker (a fraction shares one GPU among workers)")

    @model_validator(mode="after")
    def _reserves_something(self) -> WorkerResources:
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("a worker must reserve some num_cpus or num_gpus, else Ray places any number of "
                             "workers on one node")
        return self


#: The ``evaluation`` keys that say how candidates are spread over processes, not how one is scored: a
#: run's recorded config leaves them out (they may change when it resumes) -- see :meth:`RunConfig.canonical`.
#: ``proposals`` among them: it changes the order in which points are proposed and told, which the
#: store's events record, not what a stored score means; a resume replays those events either way.
EXECUTOR_KEYS = frozenset({"executor", "workers", "ray_address", "resources_per_worker", "proposals"})


class EvaluationConfig(FiniteConfigModel):
    backend: Literal["hf", "vllm"] = "hf"
    executor: Literal["local", "ray"] = Field(
        "local", description="local: one live model in this process; ray: `workers` Ray actors, each with its own "
        "live model, score candidates in parallel while this process writes the run store"
    )
    workers: int = Field(1, ge=1, description="parallel evaluators (executor: ray); level 1 asks its optimiser for "
                         "this many candidates at a time")
    ray_address: str | None = Field(
        None, description="executor: ray: the cluster to join (auto: the one running here, or host:port, "
        "ray://host:port); None starts a Ray instance in this process unless one is already initialised"
    )
    resources_per_worker: WorkerResources = WorkerResources()
    proposals: Literal["batch", "async"] = Field(
        "batch", description="batch: level 1 asks for `workers` points, scores them, tells them in proposal order "
        "(reproducible from seed and workers); async: a worker that finishes gets a new point at once, proposed "
        "while the workers scored, with the points in flight pending (less idle time; the order depends on "
        "timing, so not reproducible)"
    )
    device: str = Field(
        "cpu", description="cpu, cuda, cuda:N or auto (cuda if available, else cpu): where merges are computed "
        "and, with hf, where the model runs (vLLM runs where its build does)"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="the evaluated model's dtype (auto: bfloat16 on cuda, float32 on cpu); merges are "
        "computed in float32 and cast to it"
    )
    vllm: VLLMEngineConfig = VLLMEngineConfig()
    batch_size: int = Field(64, ge=1)
    validation_examples: int | None = Field(
        64, ge=1, description="first N examples of the validation split scored per candidate (None: all)"
    )
    test_examples: int | None = Field(None, ge=1, description="first N test examples for the final front (None: all)")
    chat_template: bool = Field(
        False, description="format every objective's prompts with the evaluated model's chat template (one user "
        "message, then the assistant's turn), as chat=true on each objective spec; for instruct models"
    )
    log_samples: bool = Field(
        False, description="write each scored (candidate, objective, split)'s per-example records -- prompt, output, "
        "target, score -- to RUN_DIR/samples/<candidate-id>/<objective>_<split>.jsonl (as --log-samples); it changes "
        "no score, so it is not part of the stored config and a resume may turn it on or off"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and not DEVICE_NAMES.match(value):
            raise ValueError(f"{value!r} is not a device: use {EVALUATION_DEVICES}")
        return value

    @model_validator(mode="after")
    def _executor(self) -> EvaluationConfig:
        if self.executor == "local":
            ray_only = [k for k in ("ray_address", "resources_per_worker", "proposals")
                        if getattr(self, k) != type(self).model_fields[k].default]
            if self.workers > 1 or ray_only:
                given = f"workers: {self.workers}" if self.workers > 1 else ray_only[0]
                raise ValueError(f"{given} is a setting of executor: ray (executor: local evaluates in this "
                                 "process, one candidate at a time); set executor: ray, e.g. --set "
                                 "evaluation.executor=ray")
            return self
        # a Ray worker sees only the GPUs Ray gives it, as cuda:0 onwards: a GPU is asked for by resources
        if self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} with executor: ray: each worker sees only the GPUs Ray "
                             "assigns it; use device: cuda (or auto) and resources_per_worker.num_gpus")
        if self.device == "cuda" and self.resources_per_worker.num_gpus == 0:
            raise ValueError("device: cuda with executor: ray needs resources_per_worker.num_gpus (Ray hides "
                             "GPUs from workers that reserve none)")
        return self

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        """The device and dtype on this machine (``auto`` resolved); a device it lacks is refused, naming the key."""
        device = resolve_device(self.device, key="evaluation.device")
        return device, resolve_dtype(self.dtype, device, key="evaluation.dtype")


class OptimizerConfig(FiniteConfigModel):
    name: str = "bo-mo"
    budget: int = Field(50, ge=1, description="candidate evaluations, initial design included")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        """An unknown name is refused with the config's file and key (the registry loads no optimiser module)."""
        from hm3.search.optimizers import OPTIMIZERS

        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}; known: {', '.join(sorted(OPTIMIZERS))}")
        return value


class FisherConfig(FiniteConfigModel):
    examples: int = Field(30, ge=1, description="validation examples per task (DF-Merge: 30)")
    coefficient_step: float = Field(
        0.05, gt=0, le=1, description="Fisher of θ_base + λτ is cached on a λ grid of this step"
    )


class RunConfig(FiniteConfigModel):
    """Models, objectives, search space, optimiser and evaluation of one level-1 run."""

    models: dict[str, str] = Field(description="model ref -> local directory or hub id (base and experts)")
    objectives: list[str] = Field(min_length=1)
    experts: dict[str, str] = Field(
        default_factory=dict,
        description="expert ref -> the objective it was fine-tuned for (Fisher examples); optional",
    )
    search_space: SearchSpace
    optimizer: OptimizerConfig = OptimizerConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    fisher: FisherConfig = FisherConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _refs(self) -> RunConfig:
        space = self.search_space
        for ref in [space.base_model, *space.models]:
            if ref not in self.models:
                raise ValueError(f"search_space names model {ref!r}, which 'models' does not define")
        for ref, objective in self.experts.items():
            if ref not in space.models:
                raise ValueError(f"experts: {ref!r} is not one of search_space.models")
            if objective not in self.objectives:
                raise ValueError(f"experts: {ref!r} serves {objective!r}, which is not in 'objectives'")
        if space.fisher and set(self.experts) != set(space.models):
            raise ValueError("fisher: true needs 'experts' to name the objective of every model")
        if space.fisher and self.evaluation.executor == "ray":
            # DF-Merge's Fisher tensors are computed through a live model, which this process lacks with Ray
            raise ValueError("fisher: true needs evaluation.executor: local")
        if space.fisher and self.evaluation.backend != "hf":
            raise ValueError("fisher: true needs evaluation.backend: hf (gradients through the live model)")
        return self

    def canonical(self) -> dict[str, Any]:
        """JSON-ready form stored in the run store (what a resume is compared against).

        The executor settings (:data:`EXECUTOR_KEYS`) are left out: they say where candidates are
        scored, not what a score is, so a run started on a Ray cluster may resume on one machine (and
        the other way round), and a run that never set them records what it did before they existed.
        ``evaluation.log_samples`` is left out for the same reason (it writes what a model answered and
        changes no score): a resume may turn it on or off. ``evaluation.chat_template`` is recorded only
        when true, so runs without it keep the config they recorded before the setting existed (and a
        resume that turns it on is refused).
        """
        left_out = set(EXECUTOR_KEYS) | {"log_samples"} | ({"chat_template"} if not self.evaluation.chat_template
                                                           else set())
        return json.loads(self.model_dump_json(exclude={"evaluation": left_out}))


def expand_zoo(data: dict[str, Any], base_dir: Path | None, source: str = "<config>") -> dict[str, Any]:
    """``zoo: DIR`` (or ``zoo: builtin:micro``, the shipped zoo) fills ``models``, ``objectives``, ``experts`` and the search space's model refs
    from ``DIR/zoo.json``; keys given explicitly win. A ``search_space`` that is not a mapping is left as given
    for validation to refuse by name."""
    from hm3.zoo.build import ZooManifest
    from hm3.zoo.shipped import resolve_zoo

    data = dict(data)
    ref = data.pop("zoo")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{source}: invalid run config:\n  zoo: a zoo folder or builtin:NAME, got {ref!r}")
    try:
        zoo_dir = resolve_zoo(ref, base_dir)
        manifest = ZooManifest.read(zoo_dir)
    except ConfigError as err:
        raise ConfigError(f"{source}: invalid run config:\n  zoo: {err}") from None
    experts = {model: objective for objective, model in manifest.experts.items()}
    data.setdefault("models", {name: str(zoo_dir / rel) for name, rel in manifest.models.items()})
    data.setdefault("objectives", list(manifest.objectives))
    space = data.get("search_space")
    if space is None or isinstance(space, dict):
        space = dict(space or {})
        space.setdefault("base_model", next(m for m in manifest.models if m not in experts))
        # the zoo's experts for the objectives searched; given models and objectives win
        objectives = data["objectives"] if isinstance(data["objectives"], list) else list(manifest.objectives)
        space.setdefault("models", [m for m, objective in experts.items() if objective in objectives] or list(experts))
        data["search_space"] = space
        searched = space["models"] if isinstance(space["models"], list) else list(experts)
        experts = {m: objective for m, objective in experts.items() if m in searched and objective in objectives}
    data.setdefault("experts", experts)
    return data


def _model_dir(ref: str, value: Any, base_dir: Path, source: str) -> Any:
    """A model of a config file: a path as given (``~`` is the user's home, as in merge recipes and ``hm3
    check``; absolute, or existing relative to the CWD), else relative to the file's folder; a hub id that names no local directory becomes its snapshot directory in the HF
    cache, so the stored config, a resume and every later read name the exact files the run used. Either way
    the path is made absolute (not resolved: symlinks stay as written)."""
    from hm3.checkpoint.hub import is_hub_name, resolve_model

    if not isinstance(value, str):
        return value  # pydantic names the wrong type
    if is_hub_name(value, base_dir):
        try:
            return str(resolve_model(value, base_dir).absolute())
        except ConfigError as err:
            raise ConfigError(f"{source}: models.{ref}: {err}") from None
    p = Path(value).expanduser()
    # absolute: a resume or a reader (hm3 front, export, request) may run from another folder
    return str((p if p.is_absolute() or p.exists() else base_dir / p).absolute())


def parse_run_config(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    """Validate a mapping; relative model paths are taken relative to ``base_dir`` (the config's folder) and
    hub ids resolved through the HF cache (both only for a config file, which gives ``base_dir``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a run config must be a mapping")
    data = expand_zoo(data, base_dir, source) if "zoo" in data else dict(data)
    if base_dir is not None and isinstance(data.get("models"), dict):
        data["models"] = {ref: _model_dir(ref, p, base_dir, source) for ref, p in data["models"].items()}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise invalid_config(err, source, "run config") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice (YAML itself keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base loader refuses it
                continue
            if line != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A run config file's YAML mapping (missing file, bad YAML and non-mappings named)."""
    data = read_yaml_file(path, what="run config", loader=_UniqueKeyLoader)
    if not isinstance(data, dict):
        raise ConfigError(f"{Path(path)}: a run config must be a mapping")
    return data
