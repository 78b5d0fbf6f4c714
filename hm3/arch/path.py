"""Layer paths: a model assembled from decoder layers taken from a pool of models of one architecture.

A path is HM3's architecture-level candidate: hops ``(model, layer)`` over a pool holding the K
experts and, last (index K), the level-1 merge for the preference at hand. Embeddings, final norm
and LM head always come from that merge. Layers may be reordered, repeated and mixed freely, so a
path of length T is an ordinary decoder of depth T: it materialises

* in memory (:func:`build_path_model`): a transformers model whose T layers *share* the pool's
  tensors, so evaluating a candidate costs no copy of its weights;
* on disk (:func:`export_path`): a plain Hugging Face checkpoint with ``num_hidden_layers = T``
  that transformers and vLLM load unchanged, and beside it mergekit's passthrough ``slices``
  config that rebuilds the same tensors from the pool directories (with mergekit or ``hm3 merge``).

Per-hop scales -- what they mean and why
---------------------------------------
A pre-norm decoder layer (Llama, Mistral, Qwen2/3) computes ``h = x + A(norm1(x))`` then
``y = h + M(norm2(h))``. Sakana's data-flow merge scales the hidden state entering each
transition, ``x -> s * x``. That is *not* a change of the layer's weights: the residual path has
no weights, and the scaled ``s * x`` travels on to every later layer. Because every branch input
is RMS-normalised, ``norm(c * x) = norm(x)`` holds only up to the norm's ``eps``, so the input
scales are equivalent to weighting every later layer's branch outputs by ``1 / prod(s)`` -- up
to ``eps``, never exactly (the eps is one config value for all layers, so it cannot be rescaled
per layer either).

hm3 therefore defines the scale in the form that *is* exactly a weight change: ``scales[t] = w``
multiplies hop t's two residual branches, ``y = h + w * M(...)`` with ``h = x + w * A(...)``;
that is, it multiplies the weights (and biases) of the branch output projections ``o_proj`` and
``down_proj``. In memory it is applied by forward hooks (no copy of the shared weights); on export
it is folded into those two tensors, and mergekit's passthrough ``scale`` parameter does the same.
Every sequence of Sakana input scales has a branch-scale equivalent (up to eps):
:func:`branch_scales_from_input_scales`. Architectures with norms *after* their branches (Gemma
2/3's sandwich norms) would undo the fold, so scales are refused for any model type not known to
be pre-norm only (:data:`hm3.checkpoint.layers.SCALABLE_MODEL_TYPES`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from hm3.checkpoint.layers import (
    BRANCH_OUTPUTS,
    check_scales_exact,
    is_branch_output,
    layer_index,
    layer_tensor_names,
    relayered_config,
    rename_layer,
)
from hm3.checkpoint.reader import Checkpoint, open_checkpoint
from hm3.checkpoint.writer import CheckpointWriter
from hm3.errors import ConfigError, IncompatibleModelsError

MERGEKIT_CONFIG_FILE = "mergekit_passthrough.yml"
PATH_FILE = "hm3_path.json"
#: A path framed by a scratch merge: the recipe of that merge, and the directory the configs name for it.
FRAME_RECIPE_FILE = "hm3_frame_recipe.yml"
FRAME_DIR = "frame"
# Config entries that fix the width of a layer: layers of models differing in any cannot be chained.
WIDTH_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


@dataclass(frozen=True)
class LayerPath:
    """An inference path: hop t runs layer ``hops[t][1]`` of pool model ``hops[t][0]``.

    ``scales`` (optional, one per hop) weights each hop's residual branches (module docstring);
    None means all 1, the plain path.
    """

    hops: tuple[tuple[int, int], ...]
    scales: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists (from JSON/YAML or an RL policy) but store hashable tuples, so paths can key caches.
        object.__setattr__(self, "hops", tuple((int(m), int(layer)) for m, layer in self.hops))
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def __len__(self) -> int:
        return len(self.hops)

    @classmethod
    def of_model(cls, model: int, num_layers: int) -> LayerPath:
        """The path running all layers of one pool model in order (the model itself)."""
        return cls(tuple((model, i) for i in range(num_layers)))

    def scale(self, t: int) -> float:
        """Branch scale of hop ``t`` (1.0 without scales)."""
        return 1.0 if self.scales is None else self.scales[t]

    def validate(self, pool_size: int, num_layers: int | Sequence[int], t_max: int | None = None) -> None:
        """Refuse a path that cannot be built over this pool, with the reason (ConfigError).

        ``num_layers`` is the layer count of every pool model, or one count per model.
        """
        counts = [num_layers] * pool_size if isinstance(num_layers, int) else list(num_layers)
        if len(counts) != pool_size:
            raise ConfigError(f"{len(counts)} layer counts given for a pool of {pool_size} models")
        if t_max is not None and t_max < 1:
            raise ConfigError(f"T_max must be >= 1, got {t_max}")
        if not self.hops:
            raise ConfigError("empty layer path: a path needs at least one hop (T >= 1)")
        if t_max is not None and len(self.hops) > t_max:
            raise ConfigError(f"layer path has {len(self.hops)} hops, more than T_max = {t_max}")
        for t, (m, layer) in enumerate(self.hops):
            if not 0 <= m < pool_size:
                raise ConfigError(f"hop {t}: model index {m} out of range for a pool of {pool_size} models")
            if not 0 <= layer < counts[m]:
                raise ConfigError(
                    f"hop {t}: layer index {layer} out of range for pool model {m} with {counts[m]} layers"
                )
        if self.scales is not None:
            if len(self.scales) != len(self.hops):
                raise ConfigError(f"{len(self.scales)} scales given for a path of {len(self.hops)} hops")
            for t, s in enumerate(self.scales):
                if not (math.isfinite(s) and s > 0):
                    raise ConfigError(f"hop {t}: scale {s!r} must be finite and positive")

    def to_json(self) -> dict[str, Any]:
        return {
            "hops": [list(h) for h in self.hops],
            "scales": None if self.scales is None else list(self.scales),
        }


def branch_scales_from_input_scales(input_scales: Sequence[float]) -> tuple[float, ...]:
    """Sakana-style input scales ``s_t`` (hidden state entering hop t times ``s_t``) as branch scales.

    Scaling the stream by ``s_t`` before hop t scales it by ``c_t = s_1 ... s_t`` from then on;
    as branch inputs are RMS-normalised this equals weighting the branches of hop t by ``1 / c_t``
    (the final norm removes the leftover ``c_T``). Exact for a norm without eps; with eps the
    difference is of relative order eps / mean(x^2).
    """
    out, c = [], 1.0
    for s in input_scales:
        c *= float(s)
        out.append(1.0 / c)
    return tuple(out)


def switch_hops(path: LayerPath) -> list[int]:
    """Hops at which the path changes model: t > 0 with ``hops[t][0] != hops[t - 1][0]`` (its transitions)."""
    return [t for t in range(1, len(path.hops)) if path.hops[t][0] != path.hops[t - 1][0]]


def with_switch_scales(path: LayerPath, input_scale: float | Sequence[float]) -> LayerPath:
    """``path`` with Sakana's input scale at each switch between models, as exact branch scales.

    ``input_scale`` is one value for every switch, or one per switch (:func:`switch_hops`); the hidden
    state entering a switch hop is multiplied by it, which :func:`branch_scales_from_input_scales`
    turns into branch scales (equal up to the norm's eps, module docstring). A path without switches
    is returned unchanged; so is a scale of 1 everywhere.
    """
    hops = switch_hops(path)
    values = [float(input_scale)] * len(hops) if isinstance(input_scale, (int, float)) else list(input_scale)
    if len(values) != len(hops):
        raise ConfigError(f"{len(values)} switch scales given for a path with {len(hops)} switches")
    if not hops or all(v == 1.0 for v in values):
        return path
    per_hop = [1.0] * len(path.hops)
    for t, v in zip(hops, values, strict=True):
        per_hop[t] = v
    return LayerPath(path.hops, branch_scales_from_input_scales(per_hop))


def scale_variants(path: LayerPath, grid: Sequence[float] | None) -> list[LayerPath]:
    """The unscaled path, then one variant per value of ``grid`` (≠ 1) as the input scale at every switch.

    A path without switches, or no grid, gives the path alone. Duplicates are dropped.
    """
    variants = [path]
    for w in grid or ():
        variant = with_switch_scales(path, w)
        if variant not in variants:
            variants.append(variant)
    return variants


def check_pool_widths(configs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """Refuse a pool whose models differ in model type or layer width, naming each model's sizes."""
    problems = []
    for key in ("model_type", *WIDTH_KEYS):
        values = [c.get(key) for c in configs]
        if len({json.dumps(v) for v in values if v is not None}) > 1:
            problems.append(f"{key}: " + ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True)))
    if problems:
        raise IncompatibleModelsError("pool models have different widths: " + "; ".join(problems))


def _layer_signature(shapes: Mapping[str, tuple[int, ...]], layer: int) -> dict[str, tuple[int, ...]]:
    """Tensors of one layer keyed by their name within the layer ('mlp.up_proj.weight' -> shape)."""
    return {rename_layer(n, 0): shapes[n] for n in layer_tensor_names(shapes, layer)}


def check_pool_layers(shapes: Sequence[Mapping[str, tuple[int, ...]]], names: Sequence[str]) -> list[int]:
    """Layer counts of the pool models, refusing any layer whose tensors differ from the merge's layer 0.

    The config check names the sizes; this one catches what configs do not say (an extra bias, a
    different head layout) so a hop can never produce a model that fails to load.
    """
    reference = _layer_signature(shapes[-1], 0)
    counts = []
    for shape_map, name in zip(shapes, names, strict=True):
        indices = {i for i in map(layer_index, shape_map) if i is not None}
        count = max(indices) + 1 if indices else 0
        for layer in range(count):
            sig = _layer_signature(shape_map, layer)
            if sig != reference:
                diff = sorted(set(sig.items()) ^ set(reference.items()))[:4]
                raise IncompatibleModelsError(
                    f"layer {layer} of pool model {name} does not match layer 0 of the merge {names[-1]}: "
                    + ", ".join(f"{n} {list(s)}" for n, s in diff)
                )
        counts.append(count)
    return counts


@dataclass(frozen=True)
class TensorSource:
    """One output tensor of a path and where it comes from."""

    name: str  # name in the path model
    model: int  # pool index
    source: str  # name in that pool model
    scale: float  # multiplies the tensor (branch outputs of a scaled hop); 1.0 otherwise


def plan_path_tensors(pool_names: Sequence[Sequence[str]], path: LayerPath) -> list[TensorSource]:
    """Every tensor of the path model: the merge's non-layer tensors, then each hop's layer renamed to t."""
    merge = len(pool_names) - 1
    plan = [TensorSource(n, merge, n, 1.0) for n in pool_names[merge] if layer_index(n) is None]
    for t, (m, layer) in enumerate(path.hops):
        for src in layer_tensor_names(pool_names[m], layer):
            scale = path.scale(t) if is_branch_output(src) else 1.0
            plan.append(TensorSource(rename_layer(src, t), m, src, scale))
    return plan


def path_config(merge_config: Mapping[str, Any], path: LayerPath) -> dict[str, Any]:
    """The merge's config for a depth-T model: ``num_hidden_layers = T``, per-layer entries remapped."""
    return relayered_config(merge_config, [layer for _, layer in path.hops])


def _check_scalable(path: LayerPath, model_type: str | None) -> None:
    if path.scales is not None and any(s != 1.0 for s in path.scales):
        check_scales_exact(model_type)


@dataclass(frozen=True)
class LayerPool:
    """Models of one architecture whose layers a path draws on; the last one is the level-1 merge.

    Construction refuses models of different widths, so every path over the pool is well formed.
    """

    states: tuple[Mapping[str, torch.Tensor], ...]
    config: dict[str, Any]  # the merge's: embeddings, norm, head and attention settings come from it
    names: tuple[str, ...]
    num_layers: tuple[int, ...]

    @classmethod
    def from_states(
        cls,
        states: Sequence[Mapping[str, torch.Tensor]],
        configs: Sequence[Mapping[str, Any]],
        names: Sequence[str] | None = None,
    ) -> LayerPool:
        """A pool over state dicts (shared, never copied) with their configs; the merge last."""
        if not states:
            raise ConfigError("empty layer pool: it needs at least the level-1 merge")
        if len(configs) != len(states):
            raise ConfigError(f"{len(configs)} configs given for a pool of {len(states)} models")
        names = tuple(names) if names is not None else tuple(f"model {i}" for i in range(len(states)))
        check_pool_widths(configs, names)
        shapes = [{n: tuple(t.shape) for n, t in s.items()} for s in states]
        counts = check_pool_layers(shapes, names)
        return cls(tuple(states), _config_dict(configs[-1]), names, tuple(counts))

    @classmethod
    def from_models(cls, models: Sequence[nn.Module], names: Sequence[str] | None = None) -> LayerPool:
        """A pool over loaded transformers models; paths share their parameters."""
        states = [{n: p.detach() for n, p in m.state_dict(keep_vars=True).items()} for m in models]
        return cls.from_states(states, [_config_dict(m.config) for m in models], names)

    @classmethod
    def load(cls, dirs: Sequence[str | Path]) -> LayerPool:
        """A pool read from model directories (every tensor in memory once; the merge last)."""
        states, configs = [], []
        for d in dirs:
            with open_checkpoint(d) as ckpt:
                states.append({n: ckpt.get(n) for n in ckpt.tensor_names()})
                configs.append(ckpt.config)
        return cls.from_states(states, configs, [str(d) for d in dirs])


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, Mapping) else config.to_dict()


def build_path_model(pool: LayerPool, path: LayerPath, *, t_max: int | None = None) -> nn.Module:
    """The path as a live transformers causal LM whose tensors are the pool's own (no copies).

    The model is built on the meta device (nothing allocated for its T layers) and each parameter
    is then replaced by the pool tensor the plan names, so ``data_ptr`` equality holds and memory
    does not grow with T. Attention ``layer_idx`` is the hop's position, so the KV cache works.
    Do not train it: the pool's weights would change under every path sharing them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path.validate(len(pool.states), pool.num_layers, t_max)
    _check_scalable(path, pool.config.get("model_type"))
    raw = path_config(pool.config, path)
    config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = plan_path_tensors([list(s) for s in pool.states], path)
    for src in plan:
        _assign_parameter(model, src.name, pool.states[src.model][src.source], pool.names[src.model])
    if config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _materialise_buffers(model, device=model.get_input_embeddings().weight.device)
    for t in range(len(path.hops)):
        if path.scale(t) != 1.0:
            _hook_branch_scale(model.model.layers[t], path.scale(t))
    return model.eval()


def path_state(pool: LayerPool, path: LayerPath, *, depth: int | None = None) -> dict[str, torch.Tensor]:
    """The path's tensors by checkpoint name (scales folded in), padded to ``depth`` layers.

    Padding hops are *identity layers*: the frame's layer 0 with its branch output projections
    (``o_proj``, ``down_proj``, and their biases) set to zero, so ``h = x + 0`` and ``y = h + 0``
    exactly. A fixed-depth engine (vLLM, which cannot change depth in place) loaded with a model of
    ``depth`` layers therefore runs any path of T <= depth hops unchanged after a weight swap.
    Unscaled tensors are the pool's own (no copy).
    """
    path.validate(len(pool.states), pool.num_layers, depth)
    _check_scalable(path, pool.config.get("model_type"))
    state: dict[str, torch.Tensor] = {}
    for src in plan_path_tensors([list(s) for s in pool.states], path):
        tensor = pool.states[src.model][src.source]
        state[src.name] = tensor if src.scale == 1.0 else (tensor.float() * src.scale).to(tensor.dtype)
    frame = pool.states[-1]
    for t in range(len(path.hops), depth or 0):
        for name in layer_tensor_names(list(frame), 0):
            tensor = frame[name]
            state[rename_layer(name, t)] = torch.zeros_like(tensor) if is_branch_output(name) else tensor
    return state


def _assign_parameter(model: nn.Module, name: str, tensor: torch.Tensor, source: str) -> None:
    """Make ``tensor`` (not a copy) the parameter ``name`` of ``model``; refuse a shape mismatch."""
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        raise IncompatibleModelsError(f"tensor {name} of {source} has no place in the path model") from None
    current = owner._parameters.get(leaf)
    if current is None:
        raise IncompatibleModelsError(f"tensor {name} of {source} has no place in the path model")
    if current.shape != tensor.shape:
        raise IncompatibleModelsError(
            f"tensor {name} of {source} is {list(tensor.shape)}, the path model expects {list(current.shape)}"
        )
    owner._parameters[leaf] = nn.Parameter(tensor.detach(), requires_grad=False)


def _materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Rebuild the modules whose buffers (rotary frequencies) were left on the meta device."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise IncompatibleModelsError(
                    f"cannot build a path model for {type(model).__name__}: buffer module {name} is not "
                    "rebuildable from the config"
                )
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, type(module)(config=module.config).to(device))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise IncompatibleModelsError(
            f"the pool does not provide tensor(s) {', '.join(meta[:5])} of {type(model).__name__}"
        )


def _hook_branch_scale(layer: nn.Module, scale: float) -> None:
    """Multiply the outputs of the layer's branch output projections by ``scale`` (= scaling their weights)."""

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * scale

    found = [m for n, m in layer.named_modules() if any(f"{n}." == frag for frag in BRANCH_OUTPUTS)]
    if len(found) != len(BRANCH_OUTPUTS):
        raise IncompatibleModelsError(
            f"{type(layer).__name__} lacks the branch outputs {', '.join(BRANCH_OUTPUTS)}; cannot scale it"
        )
    for module in found:
        module.register_forward_hook(hook)


def mergekit_passthrough_config(
    pool_dirs: Sequence[str | Path], path: LayerPath, dtype: str | None
) -> dict[str, Any]:
    """mergekit's passthrough ``slices`` config building the same model as :func:`export_path`.

    mergekit takes embeddings from the first slice's model and final norm and LM head from the last
    one's, so the path is framed by two empty slices (``layer_range: [0, 0]``) of the merge. ``dtype``
    None (the pool's tensors differ in dtype): no ``dtype`` key, so each tensor stays in its own.
    Directories are named as given (the caller resolves them, or names one relative to the config).
    """
    dirs = [str(d) for d in pool_dirs]
    slices: list[dict[str, Any]] = [_empty_slice(dirs[-1])]
    for t, (m, layer) in enumerate(path.hops):
        source: dict[str, Any] = {"model": dirs[m], "layer_range": [layer, layer + 1]}
        if path.scale(t) != 1.0:
            w = path.scale(t)
            source["parameters"] = {"scale": [{"filter": f.rstrip("."), "value": w} for f in BRANCH_OUTPUTS]}
        slices.append({"sources": [source]})
    slices.append(_empty_slice(dirs[-1]))
    return {"merge_method": "passthrough", **({"dtype": dtype} if dtype is not None else {}), "slices": slices}


def _empty_slice(model_dir: str) -> dict[str, Any]:
    """A slice of no layers: only selects the model mergekit reads embeddings or the head from."""
    return {"sources": [{"model": model_dir, "layer_range": [0, 0]}]}


def export_path(
    pool_dirs: Sequence[str | Path],
    path: LayerPath,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    t_max: int | None = None,
    force: bool = False,
    frame_recipe: dict[str, Any] | None = None,
) -> Path:
    """Write the path as a plain HF checkpoint (tokenizer from the merge, the last pool directory).

    Scales are folded into ``o_proj``/``down_proj`` (computed in float32, stored in the tensor's
    dtype). Beside the weights: ``mergekit_passthrough.yml`` and ``hm3_path.json`` (hops, scales,
    pool). Tensors stream one at a time; the directory appears only when complete.

    ``frame_recipe``: the last pool directory is a scratch merge the caller removes afterwards, made by
    this recipe. The configs then name it as the directory ``frame`` beside them, and the output holds
    the recipe (:data:`FRAME_RECIPE_FILE`) that writes it: ``hm3 merge hm3_frame_recipe.yml frame``.
    """
    if not pool_dirs:
        raise ConfigError("empty layer pool: it needs at least the level-1 merge")
    ckpts = [open_checkpoint(d) for d in pool_dirs]
    try:
        return _export(ckpts, path, Path(out_dir), overwrite=overwrite, t_max=t_max, force=force,
                       frame_recipe=frame_recipe)
    finally:
        for c in ckpts:
            c.close()


def _export(
    ckpts: list[Checkpoint], path: LayerPath, out_dir: Path, *, overwrite: bool, t_max: int | None,
    force: bool = False, frame_recipe: dict[str, Any] | None = None,
) -> Path:
    names = [str(c.path) for c in ckpts]
    check_pool_widths([c.config for c in ckpts], names)
    counts = check_pool_layers([{n: c.shape(n) for n in c.tensor_names()} for c in ckpts], names)
    path.validate(len(ckpts), counts, t_max)
    merge = ckpts[-1]
    _check_scalable(path, merge.config.get("model_type"))
    plan = plan_path_tensors([c.tensor_names() for c in ckpts], path)
    layout = [(s.name, ckpts[s.model].shape(s.source), ckpts[s.model].dtype(s.source)) for s in plan]
    # one dtype for the whole model only where its tensors share it (bfloat16 experts in a float32 frame do
    # not): converting would change the expert layers, and a scaled one would no longer be rounded as here
    dtypes = {dt for _, _, dt in layout if dt.is_floating_point}
    dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
    pool = [str(Path(n).resolve()) for n in names]
    header, frame_files = "", {}
    if frame_recipe is not None:  # the scratch frame is gone once the output is published: name what rebuilds it
        pool[-1] = FRAME_DIR
        header = (f"# {FRAME_DIR}: the merge this path is framed by; write it first, in this directory:\n"
                  f"#   hm3 merge {FRAME_RECIPE_FILE} {FRAME_DIR}\n")
        frame_files = {FRAME_RECIPE_FILE: yaml.safe_dump(frame_recipe, sort_keys=False)}
    extra = {
        MERGEKIT_CONFIG_FILE: header + yaml.safe_dump(mergekit_passthrough_config(pool, path, dtype), sort_keys=False),
        PATH_FILE: json.dumps({**path.to_json(), "pool": pool}, indent=2) + "\n",
        **frame_files,
    }
    with CheckpointWriter(
        out_dir,
        config=path_config(merge.config, path),
        overwrite=overwrite,
        tokenizer_from=merge.path,
        extra_files=extra,
        layout=layout,
        force=force,
        inputs=[c.path for c in ckpts],
    ) as writer:
        for src in plan:
            tensor = ckpts[src.model].get(src.source)
            if src.scale != 1.0:
                tensor = (tensor.float() * src.scale).to(tensor.dtype)
            writer.add(src.name, tensor)
    return out_dir
