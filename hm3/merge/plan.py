"""Planner: a recipe + checkpoints -> a list of per-tensor jobs with every parameter resolved.

Planning does all validation up front (method, parameter names and ranges,
model compatibility, Fisher files), so a bad recipe fails before a single
tensor is merged or a byte is written. The executors (:mod:`hm3.merge.engine`
for disk, :mod:`hm3.merge.inmemory` for the search loop) only run the jobs.

Each job names the input tensors it reads (model and tensor name), so one engine
runs both recipe kinds: a ``models:`` recipe reads a tensor of the same name from
every model, a ``slices:`` recipe reads layer ``start + k`` of each source for
output layer ``k`` of a slice (:mod:`hm3.merge.slices`).

A recipe that names a tokenizer (``tokenizer_source`` or a ``tokenizer`` block) merges over one
vocabulary (:mod:`hm3.merge.tokenizer`, :mod:`hm3.merge.vocab`): the jobs of the token embedding and
LM head carry the rearrangement of their inputs' rows, which the executor applies as it reads them.
Without one, models whose vocabularies differ are refused, as mergekit refuses them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.checkpoint import (
    Checkpoint,
    check_compatible,
    layer_index,
    layer_tensor_names,
    open_checkpoint,
    rename_layer,
)
from hm3.checkpoint.hub import resolve_model
from hm3.checkpoint.layers import (
    check_scales_exact,
    is_input_embedding,
    is_vocabulary_tensor,
    relayered_config,
)
from hm3.checkpoint.reader import LM_HEAD
from hm3.config import MASK_RNGS, MergeConfig, TokenSetting, parameter_places
from hm3.errors import ConfigError, IncompatibleModelsError
from hm3.merge import ops
from hm3.merge.methods import MergeMethod, ParamSpec, all_parameter_names, get_method
from hm3.merge.parameters import layer_position, resolve_in, validator
from hm3.merge.slices import SliceGroup, slice_groups
from hm3.merge.tokenizer import OutputTokenizer, TokenizedModel, build_output_tokenizer, has_tokenizer
from hm3.merge.vocab import MergedVocabulary, RowPlan, merged_vocabulary, row_plan

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
#: The drop-mask draw of a recipe that names none: the one every recipe was scored with before
#: ``mask_rng`` existed, so such recipes keep their tensors (:func:`mask_generator`).
DEFAULT_MASK_RNG = "mt19937"


def parse_dtype(name: str | None, *, key: str) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"'{key}': unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class SourceTensor:
    """One input tensor of a job: the plan's checkpoint (an index into ``MergePlan.checkpoints``) and
    the tensor's name there."""

    checkpoint: int
    name: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name, depth, every parameter resolved to a number and what it reads.

    ``model_params`` and ``inputs`` run parallel: the models fed to the method (the non-base ones for
    task-vector methods). The pure resolver (:func:`resolve_jobs`, used in memory) leaves the sources
    empty; :func:`plan_merge` fills them in.
    """

    name: str
    layer: int | None
    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]
    base: SourceTensor | None = None
    inputs: tuple[SourceTensor, ...] = ()
    rows: RowPlan | None = field(default=None, compare=False)  # a vocabulary tensor's rows, rearranged

    @property
    def sources(self) -> tuple[SourceTensor, ...]:
        """Every tensor the job reads: the base (when it has one), then the inputs."""
        return ((self.base,) if self.base is not None else ()) + self.inputs

    @property
    def lead(self) -> SourceTensor:
        """The input whose shape and dtype the output has: the base, else the first input."""
        return self.base if self.base is not None else self.inputs[0]


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    checkpoints: list[Checkpoint]  # every model a job reads, each once
    reference: Checkpoint  # the output's config and tokenizer come from it: the base, else the first model
    jobs: list[TensorJob]
    compute_dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    seed: int
    mask_rng: str = DEFAULT_MASK_RNG
    fisher_files: list[Path] | None = None
    output_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: OutputTokenizer | None = None  # None: the reference's tokenizer files are copied

    def source(self, src: SourceTensor) -> Checkpoint:
        return self.checkpoints[src.checkpoint]

    def output_shape(self, job: TensorJob) -> tuple[int, ...]:
        """The merged tensor's shape: its lead input's, with the output vocabulary's rows for a rearranged one."""
        shape = tuple(self.source(job.lead).shape(job.lead.name))
        return shape if job.rows is None else (job.rows.rows, *shape[1:])

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


def _check_parameter_names(config: MergeConfig, method: MergeMethod) -> None:
    known_here = {p.name for p in (*method.params, *method.model_params)}
    per_model = {p.name for p in method.model_params}
    known_anywhere = all_parameter_names()
    for where, params in parameter_places(config):
        for name in params:
            if name in known_here:
                if "(" in where and name not in per_model:  # a model's place: parameter_places names the model
                    log.warning(f"{where}.{name} is not used per model by merge_method {method.name!r}: it is "
                                "read from the recipe's (or a slice's) parameters only")
                continue
            if name in known_anywhere:
                log.warning(f"{where}.{name} is not used by merge_method {method.name!r}")
                continue
            raise ConfigError(
                f"unknown parameter '{where}.{name}' for merge_method {method.name!r}; "
                f"known: {', '.join(sorted(known_here))}"
            )
    if takes_base(config, method):  # the base is dropped from the merged models (mergekit's rule), with its settings
        for i, m in enumerate(config.models or ()):
            if m.model == config.base_model and m.parameters:
                log.warning(f"models[{i}] ({m.model}) is base_model, which merge_method {method.name!r} does not "
                            f"merge as a model: its parameters ({', '.join(m.parameters)}) are not used")


Scopes = list[dict[str, Any] | None]


def _resolve_one(spec: ParamSpec, scopes: Scopes, *, tensor: str, t: float, where: str) -> Any:
    """One parameter's value for one tensor; ``where`` ('model 'm', ' or '') prefixes the tensor in messages."""
    value = resolve_in(scopes, spec.name, tensor_name=tensor, t=t, default=spec.default,
                       validate=validator(spec.value_type))
    if value is None:
        if spec.required:
            raise ConfigError(f"missing required parameter '{spec.name}' ({where}tensor {tensor})")
        return None
    problem = spec.check(value)
    if problem:
        raise ConfigError(f"parameter '{spec.name}' ({where}tensor {tensor}) {problem}")
    return value


@dataclass(frozen=True)
class _Input:
    """How one model's parameters are found for one tensor: its settings, most specific first, and
    the tensor name its filters are matched against (mergekit matches a model's own parameters
    against the tensor it reads from that model)."""

    ref: str
    scopes: Scopes
    tensor: str


def _job(
    method: MergeMethod, name: str, layer: int | None, t: float, shared: Scopes, inputs: Sequence[_Input],
    *, prefix: str = "",
) -> TensorJob:
    params = {p.name: _resolve_one(p, shared, tensor=name, t=t, where=prefix) for p in method.params}
    model_params = []
    for x in inputs:
        where = f"{prefix}model {x.ref!r}, "
        values = {p.name: _resolve_one(p, x.scopes, tensor=x.tensor, t=t, where=where)
                  for p in method.model_params}
        problem = method.check_model(values) if method.check_model is not None else None
        if problem:
            raise ConfigError(
                f"{prefix}merge_method {method.name!r}, model {x.ref!r}, tensor {x.tensor}: {problem}"
            )
        model_params.append(values)
    job = TensorJob(name=name, layer=layer, params=params, model_params=tuple(model_params))
    weights = [float(mp["weight"]) for mp in job.model_params] if method.name in _NORMALIZING else []
    if weights and params.get(_NORMALIZING[method.name]) and abs(sum(weights)) < 1e-8:
        raise ConfigError(f"{prefix}{method.name} with {_NORMALIZING[method.name]}: the model weights sum to 0 "
                          f"(tensor {name})")  # weights may be gradients: the tensor names the depth
    return job


#: the methods that divide the models' weights by their sum, and the parameter that asks them to: a sum of 0
#: would make every merged tensor inf or NaN, so it is refused while planning
_NORMALIZING = {"linear": "normalize", "multislerp": "normalize_weights"}


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
    if config.models is None:
        raise ConfigError("a 'slices' recipe is planned with its models on disk (plan_merge)")
    own = {m.model: m.parameters for m in config.models}
    jobs = []
    for name in tensor_names:
        layer = layer_index(name)
        t = layer_position(layer, num_layers)
        inputs = [_Input(ref, [own.get(ref), config.parameters], name) for ref in input_refs]
        jobs.append(_job(method, name, layer, t, [config.parameters], inputs))
    return jobs


def takes_base(config: MergeConfig, method: MergeMethod) -> bool:
    """Whether ``base_model`` is the method's base (task vectors are taken from it), not one of its inputs."""
    return method.needs_base or (method.optional_base and bool(config.base_model))


def _check_model_count(
    method: MergeMethod, refs: list[str], *, besides_base: bool, listing: str = "'models'"
) -> None:
    low, high = method.min_models, method.max_models
    if low <= len(refs) and (high is None or len(refs) <= high):
        return
    wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
    where = " besides base_model" if besides_base else ""
    raise ConfigError(
        f"merge_method {method.name!r} merges {wanted} model{'s' if high != 1 else ''}{where}; "
        f"{listing} lists {len(refs)}{where}: {', '.join(refs)}"
    )


def input_refs_for(config: MergeConfig, method: MergeMethod) -> list[str]:
    """Which listed models feed the method, in config order (mergekit's semantics)."""
    if config.models is None:
        raise ConfigError("a 'slices' recipe has no 'models' list: its models are its slices' sources")
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


def mask_generator(mask_rng: str, seed: int, tensor_name: str, model_index: int) -> ops.MaskGenerator:
    """The drop-mask generator of one (tensor, model) under a recipe's ``mask_rng`` (:data:`MASK_RNGS`).

    ``mt19937`` is :func:`dare_generator`, the draw every recipe without ``mask_rng`` was scored with.
    ``sfc64`` seeds numpy's SFC64 from the same SHA-256 of (seed, tensor, model) through a SeedSequence:
    its raw stream is fixed by numpy's compatibility policy and gives a mask at about half the cost of
    torch's CPU ``rand`` (which draws serially from a Mersenne Twister).
    """
    if mask_rng == "mt19937":
        return dare_generator(seed, tensor_name, model_index)
    if mask_rng == "sfc64":
        digest = hashlib.sha256(f"{seed}/{tensor_name}/{model_index}".encode()).digest()
        return np.random.SFC64(np.random.SeedSequence(int.from_bytes(digest[:16], "little")))
    raise ConfigError(f"mask_rng {mask_rng!r} is not one of {', '.join(MASK_RNGS)}")


def plan_merge(config: MergeConfig, *, config_dir: Path | None = None, seed: int | None = None) -> MergePlan:
    """Validate ``config`` against its models (local directories, or hub ids through the HF cache:
    :mod:`hm3.checkpoint.hub`) and resolve every tensor's job."""
    method = get_method(config.merge_method)
    _check_parameter_names(config, method)
    compute_dtype = parse_dtype(config.dtype, key="dtype")
    out_dtype = parse_dtype(config.out_dtype, key="out_dtype") or compute_dtype
    plan_models = _plan_models if config.slices is None else _plan_slices
    opened: list[Checkpoint] = []
    try:
        jobs, output_config, fisher_files, tokenizer = plan_models(config, method, opened, config_dir)
    except BaseException:
        for c in opened:
            c.close()
        raise
    if out_dtype is not None:  # under both keys: transformers 5 reads "dtype" (which it writes) first
        name = str(out_dtype).removeprefix("torch.")
        output_config["torch_dtype"] = name
        if "dtype" in output_config:
            output_config["dtype"] = name
    return MergePlan(
        config=config,
        method=method,
        checkpoints=opened,
        reference=opened[0],
        jobs=jobs,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
        seed=seed if seed is not None else (config.seed if config.seed is not None else DEFAULT_SEED),
        mask_rng=config.mask_rng or DEFAULT_MASK_RNG,
        fisher_files=fisher_files,
        output_config=output_config,
        tokenizer=tokenizer,
    )


def _check_scales(job: TensorJob, plan_checkpoints: Sequence[Checkpoint], places: Sequence[str]) -> None:
    """Refuse a passthrough ``scale`` other than 1 on a model type where it is not an exact branch weight
    (:func:`hm3.checkpoint.layers.check_scales_exact`); ``places`` name each input in messages."""
    for values, src, where in zip(job.model_params, job.inputs, places, strict=True):
        scale = values.get("scale")
        if scale is None or scale == 1.0:
            continue
        try:
            check_scales_exact(plan_checkpoints[src.checkpoint].config.get("model_type"), "'scale' values")
        except ConfigError as e:
            raise ConfigError(f"{where}: scale {scale} (tensor {src.name}): {e}") from None


def _embedding_rows(ckpt: Checkpoint) -> int | None:
    """How many tokens a model has rows for: its token embedding's rows (the LM head's where it has none)."""
    name = ckpt.input_embedding_name
    if name is None and LM_HEAD in ckpt.tensor_names():
        name = LM_HEAD
    return ckpt.shape(name)[0] if name is not None else None


def check_same_vocabulary(opened: Sequence[Checkpoint], refs: Sequence[str], *,
                          remedy: str = "Give 'tokenizer_source' (base, union or a model) or a 'tokenizer' block "
                                        "to merge them over one vocabulary") -> None:
    """Refuse models whose vocabularies differ when no tokenizer is named to merge them over; ``remedy`` is
    the message's last sentence (what the caller's user can set).

    mergekit 0.1.5 refuses them too (a tensor size mismatch in its merge); merging row for row would pair
    different tokens, and neither tool truncates or pads silently.
    """
    sizes = [(ref, _embedding_rows(c), c.vocab_size) for ref, c in zip(refs, opened, strict=True)]
    if len({(rows, vocab) for _, rows, vocab in sizes}) > 1:
        listed = ", ".join(f"{ref} has {rows} embedding rows (vocab_size {vocab})" for ref, rows, vocab in sizes)
        raise IncompatibleModelsError(f"the models' vocabularies differ: {listed}. {remedy}")


def _plan_vocabulary(
    config: MergeConfig, opened: Sequence[Checkpoint], refs: Sequence[str], config_dir: Path | None
) -> tuple[MergedVocabulary | None, OutputTokenizer | None]:
    """:func:`output_vocabulary` of a recipe (its tokenizer source and ``tokenizer`` block)."""
    source = config.vocabulary_source
    if source is None:
        return None, None
    base_ref = config.base_model if config.base_model in refs else refs[0]
    tok = config.tokenizer
    return output_vocabulary(source, opened, refs, base_ref, config_dir,
                             settings=tok.tokens if tok is not None else None,
                             pad=tok.pad_to_multiple_of if tok is not None else None)


def output_vocabulary(
    source: str, opened: Sequence[Checkpoint], refs: Sequence[str], base_ref: str, config_dir: Path | None = None,
    *, settings: Mapping[str, TokenSetting] | None = None, pad: int | None = None,
) -> tuple[MergedVocabulary | None, OutputTokenizer | None]:
    """The output tokenizer of tokenizer source ``source`` and the rows of every opened checkpoint in it.

    ``refs`` names each opened checkpoint; ``base_ref`` (one of them) is the tokenizer's base. The
    streaming planner and the searches' in-memory merger both take their vocabulary from here, so a
    search's merge and ``hm3 merge`` of its recipe map the same rows. The vocabulary is None when
    nothing needs rearranging (every model already has the output's tokens in its rows, in order), and
    both are None for ``base`` over models that have no tokenizer files but agree on their vocabulary
    (nothing to rearrange, and nothing to copy).
    """
    models = []
    for ref, ckpt in zip(refs, opened, strict=True):
        rows = _embedding_rows(ckpt)
        if rows is None:
            raise IncompatibleModelsError(
                f"tokenizer_source {source!r}: model {ref} ({ckpt.path}) has no token embedding to map onto the "
                "merged vocabulary"
            )
        models.append(TokenizedModel(ref, Path(ckpt.path).resolve(), min(rows, ckpt.vocab_size or rows)))
    base = models[list(refs).index(base_ref)]
    if source == "base" and not settings and not pad and not has_tokenizer(base.path):
        check_same_vocabulary(opened, refs)  # nothing to map with, so nothing may need mapping
        return None, None
    source_model = None
    if source not in ("base", "union"):
        path = resolve_model(source, config_dir).resolve()
        source_model = next((m for m in models if m.path == path), TokenizedModel(source, path, 0))
    tokenizer, model_rows = build_output_tokenizer(source, base, models, source_model, list(settings or {}))
    checkpoint_of = {ref: k for k, ref in enumerate(refs)}
    for setting in (settings or {}).values():  # a model named by another spelling of its path
        ref = getattr(setting.source, "model", setting.source)
        if isinstance(ref, str) and ref not in checkpoint_of:
            try:
                path = resolve_model(ref, config_dir).resolve()
            except ConfigError:
                continue  # refused by name when the vocabulary is built
            match = next((k for k, m in enumerate(models) if m.path == path), None)
            if match is not None:
                checkpoint_of[ref] = match
    vocabulary = merged_vocabulary(
        tokenizer.vocab,
        {k: model_rows[ref] for k, ref in enumerate(refs)},
        dict(enumerate(refs)),
        {k: m.rows for k, m in enumerate(models)},
        settings,
        checkpoint_of,
        pad,
    )
    if vocabulary.is_identity:
        return None, tokenizer
    return vocabulary, tokenizer


class _Rows:
    """Attaches each vocabulary job's row rearrangement, computed once per set of inputs."""

    def __init__(self, vocabulary: MergedVocabulary | None, opened: Sequence[Checkpoint]):
        self.vocabulary = vocabulary
        self.opened = opened
        self._cache: dict[tuple, RowPlan] = {}

    def __call__(self, job: TensorJob, base: int | None) -> TensorJob:
        if self.vocabulary is None or not is_vocabulary_tensor(job.name):
            return job
        inputs = tuple(src.checkpoint for src in job.sources)
        rows = tuple(self.opened[src.checkpoint].shape(src.name)[0] for src in job.sources)
        key = (inputs, base, rows)
        if key not in self._cache:
            self._cache[key] = row_plan(self.vocabulary, inputs, base, tensor=job.name, input_rows=rows)
        return replace(job, rows=self._cache[key])


def vocabulary_config(config: dict[str, Any], vocabulary: MergedVocabulary | None,
                   tokenizer: OutputTokenizer | None) -> dict[str, Any]:
    """The output's config with its vocabulary's size (mergekit sets it whenever it builds a tokenizer)."""
    if tokenizer is None:
        return config
    rows = vocabulary.rows if vocabulary is not None else len(tokenizer.vocab)
    return {**config, "vocab_size": rows}


def _plan_models(
    config: MergeConfig, method: MergeMethod, opened: list[Checkpoint], config_dir: Path | None
) -> tuple[list[TensorJob], dict[str, Any], list[Path] | None, OutputTokenizer | None]:
    """A ``models:`` recipe: every output tensor merges the tensor of the same name of every model.

    Opens the base (when the method takes one) and the inputs into ``opened``, in that order.
    """
    refs = input_refs_for(config, method)
    fisher_files = _fisher_files(config, method, refs, config_dir)
    has_base = takes_base(config, method)
    opened_refs = ([config.base_model] if has_base else []) + refs
    for ref in opened_refs:
        opened.append(open_checkpoint(resolve_model(ref, config_dir)))
    if config.vocabulary_source is None:
        check_same_vocabulary(opened, opened_refs)
    check_compatible(opened, same_vocab=config.vocabulary_source is None)
    vocabulary, tokenizer = _plan_vocabulary(config, opened, opened_refs, config_dir)
    with_rows = _Rows(vocabulary, opened)
    vocab_base = opened_refs.index(config.base_model) if config.base_model in opened_refs else None
    reference = opened[0]
    jobs = resolve_jobs(config, method, tensor_names=reference.tensor_names(), num_layers=reference.num_layers,
                        input_refs=refs)
    first = 1 if has_base else 0
    places = [f"models[{[m.model for m in config.models].index(r)}] ({r})" for r in refs]
    sourced = []
    for job in jobs:
        job = replace(
            job,
            base=SourceTensor(0, job.name) if has_base else None,
            inputs=tuple(SourceTensor(first + k, job.name) for k in range(len(refs))),
        )
        _check_scales(job, opened, places)
        sourced.append(with_rows(job, vocab_base))
    return sourced, vocabulary_config(dict(reference.config), vocabulary, tokenizer), fisher_files, tokenizer


def _plan_slices(
    config: MergeConfig, method: MergeMethod, opened: list[Checkpoint], config_dir: Path | None
) -> tuple[list[TensorJob], dict[str, Any], None, OutputTokenizer | None]:
    """A ``slices:`` recipe: each output layer merges one layer of each source of its slice (mergekit's rules,
    :mod:`hm3.merge.slices`); the output config is the base's, else the first source's, with the new depth.

    Opens ``base_model`` (when given) and every source model into ``opened``, in that order.
    """
    assert config.slices is not None
    for where, params in parameter_places(config):
        if "fisher" in params:
            raise ConfigError(
                f"{where}.fisher: Fisher weighting is not supported in 'slices' recipes; use 'models:'"
            )
    if method.requires_fisher:
        raise ConfigError(
            f"merge_method {method.name!r} needs Fisher files, which 'slices' recipes do not take"
        )
    sources = [src.model for s in config.slices for src in s.sources]
    refs = list(dict.fromkeys(([config.base_model] if config.base_model else []) + sources))
    index = {}
    for ref in refs:
        index[ref] = len(opened)
        opened.append(open_checkpoint(resolve_model(ref, config_dir)))
    if config.vocabulary_source is None:
        check_same_vocabulary(opened, refs)
    check_compatible(opened, same_depth=False, same_vocab=config.vocabulary_source is None)
    vocabulary, tokenizer = _plan_vocabulary(config, opened, refs, config_dir)
    with_rows = _Rows(vocabulary, opened)
    groups = slice_groups(config.slices, {ref: opened[i].num_layers for ref, i in index.items()})
    jobs: list[TensorJob] = []
    source_layers: list[int] = []
    first_layer: dict[str, tuple[int, ...]] | None = None
    for group in groups:
        group_jobs = _slice_group_jobs(config, method, group, opened, index)
        base_ref = config.slices[group.slice].base_model or config.base_model
        group_jobs = [with_rows(job, index.get(base_ref)) for job in group_jobs]
        if group.part == "layer":
            signature = {rename_layer(j.name, 0): opened[j.lead.checkpoint].shape(j.lead.name)
                         for j in group_jobs}
            if first_layer is None:
                first_layer = signature
            elif signature != first_layer:
                different = sorted(set(signature.items()) ^ set(first_layer.items()))[:4]
                raise IncompatibleModelsError(
                    f"{group.where}: its tensors differ from output layer 0's: "
                    + ", ".join(f"{n} {list(shape)}" for n, shape in different)
                )
            source_layers.append(group.source_layers[0])
        jobs += group_jobs
    reference = opened[0]  # the base, else the first slice's first source
    output_config = vocabulary_config(relayered_config(reference.config, source_layers), vocabulary, tokenizer)
    return jobs, output_config, None, tokenizer


def _slice_roles(config: MergeConfig, method: MergeMethod, group: SliceGroup) -> tuple[int | None, list[int]]:
    """Which of the group's sources is the method's base (None: no base) and which are its inputs.

    mergekit's rules: a method that takes a base finds it among the slice's own sources (the slice's
    ``base_model``, else the recipe's); other methods ignore ``base_model`` and merge every source.
    """
    definition = config.slices[group.slice]
    refs = [src.model for src in group.sources]
    twice = next((r for r in refs if refs.count(r) > 1), None)
    if twice is not None:
        raise ConfigError(f"{group.where}: model {twice!r} is listed twice among the sources of one slice")
    base_ref = definition.base_model or config.base_model
    if method.needs_base or (method.optional_base and base_ref):
        if not base_ref:
            raise ConfigError(
                f"merge_method {method.name!r} needs 'base_model' (of the recipe or of slices[{group.slice}])"
            )
        if base_ref not in refs:
            raise ConfigError(
                f"{group.where}: merge_method {method.name!r} takes base_model {base_ref!r} from the slice's "
                f"sources, which are {', '.join(refs)}"
            )
        base = refs.index(base_ref)
        inputs = [k for k in range(len(refs)) if k != base]
    else:
        base, inputs = None, list(range(len(refs)))
    _check_model_count(method, [refs[k] for k in inputs], besides_base=base is not None,
                       listing=group.where)
    return base, inputs


def _slice_group_jobs(
    config: MergeConfig,
    method: MergeMethod,
    group: SliceGroup,
    opened: Sequence[Checkpoint],
    index: dict[str, int],
) -> list[TensorJob]:
    """The jobs of one group: its output tensors, each read from every source of the group."""
    base, inputs = _slice_roles(config, method, group)
    definition = config.slices[group.slice]
    ckpts = [opened[index[src.model]] for src in group.sources]
    lead = ckpts[0]
    if group.part == "layer":
        names = [(rename_layer(n, group.layer), [rename_layer(n, layer) for layer in group.source_layers])
                 for n in layer_tensor_names(lead.tensor_names(), group.source_layers[0])]
        expected = {rename_layer(n, 0) for n, _ in names}
        for src, ckpt, layer in zip(group.sources, ckpts, group.source_layers, strict=True):
            found = {rename_layer(n, 0) for n in layer_tensor_names(ckpt.tensor_names(), layer)}
            if found != expected:
                raise IncompatibleModelsError(
                    f"{group.where}: layer {layer} of {src.model} and layer {group.source_layers[0]} of "
                    f"{group.sources[0].model} hold different tensors: {', '.join(sorted(found ^ expected)[:4])}"
                )
    else:
        outside = [n for n in lead.tensor_names() if layer_index(n) is None]
        before = group.part == "before"
        names = [(n, [n] * len(ckpts)) for n in outside if is_input_embedding(n) == before]
    shared: Scopes = [definition.parameters, config.parameters]
    places = [f"slices[{group.slice}].sources[{k}] ({group.sources[k].model})" for k in inputs]
    jobs = []
    for out_name, source_names in names:
        # rows of a vocabulary tensor may differ when a tokenizer maps them onto one vocabulary
        first = 1 if config.vocabulary_source is not None and is_vocabulary_tensor(out_name) else 0
        shapes = {ckpt.shape(n)[first:] for ckpt, n in zip(ckpts, source_names, strict=True)}
        if len(shapes) > 1:
            raise IncompatibleModelsError(
                f"{group.where}: tensor {out_name} has different shapes in the slice's sources: "
                + ", ".join(f"{src.model} {list(ckpt.shape(n))}"
                            for src, ckpt, n in zip(group.sources, ckpts, source_names, strict=True))
            )
        reads = [SourceTensor(index[src.model], n) for src, n in zip(group.sources, source_names, strict=True)]
        own = [_Input(group.sources[k].model, [group.sources[k].parameters, *shared], source_names[k])
               for k in inputs]
        job = _job(method, out_name, group.layer, group.t, shared, own, prefix=f"{group.where}: ")
        job = replace(job, base=reads[base] if base is not None else None, inputs=tuple(reads[k] for k in inputs))
        _check_scales(job, opened, places)
        jobs.append(job)
    return jobs
