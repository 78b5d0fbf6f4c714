"""Streaming executor: run a :class:`~hm3.merge.plan.MergePlan` tensor by tensor to disk.

Peak memory is O(models × largest tensor): one tensor of every input is in
memory at a time (and the next one being read ahead, with at most
:data:`DRAW_AHEAD_BYTES` of its random masks' draws), and the writer streams
each merged tensor to its place in the output file as it arrives. Reading, merging and writing overlap: a reader thread loads the next
job's tensors while the main thread merges the current one, and the writer
flushes shards on its own thread. The merge math itself runs on torch's
intra-op threads (both cores) and optionally on a GPU (``device="cuda"``).
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from hm3.checkpoint import CheckpointWriter, SafetensorsFile, check_finite
from hm3.checkpoint.reader import non_finite_counts
from hm3.config import MergeConfig, load_merge_config, naming
from hm3.devices import check_device
from hm3.errors import CheckpointError, ConfigError, Hm3Warning
from hm3.log import progress_bar
from hm3.merge.methods import TensorInputs
from hm3.merge.ops import DrawnAhead, MaskGenerator
from hm3.merge.plan import MergePlan, SourceTensor, TensorJob, mask_generator, plan_merge
from hm3.merge.vocab import remap_rows


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    tensors: int
    seconds: float


class _FisherSource:
    """Lazy access to per-model Fisher tensors stored as safetensors files."""

    def __init__(self, files: list[Path], stack: ExitStack):
        self.files = files
        self.handles = []
        for f in files:
            try:
                self.handles.append(stack.enter_context(SafetensorsFile(f)))
            except Exception as err:  # safetensors raises several private error types
                raise CheckpointError(f"cannot read Fisher file {f}: {err}") from None

    def get(self, name: str, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """Each file's tensor ``name``, checked to have ``shapes[k]`` (its model's tensor as merged): the
        merge is elementwise, so another shape would broadcast silently instead of failing."""
        out = []
        for f, h, shape in zip(self.files, self.handles, shapes, strict=True):
            if name not in h.keys():  # noqa: SIM118 (not a dict)
                raise CheckpointError(f"Fisher file {f} has no tensor {name!r}")
            t = h.get(name).float()
            if t.shape != shape:
                raise CheckpointError(f"Fisher tensor {name!r} in {f} has shape {tuple(t.shape)}, "
                                      f"the model's tensor {tuple(shape)}")
            if (t < 0).any() or not torch.isfinite(t).all():
                raise CheckpointError(f"Fisher tensor {name!r} in {f} has negative or non-finite entries")
            out.append(t)
        return out


def _load_job_inputs(plan: MergePlan, job: TensorJob, fisher: _FisherSource | None, device: torch.device):
    def load(src: SourceTensor) -> torch.Tensor:
        ckpt = plan.source(src)
        t = ckpt.get(src.name)
        check_finite(src.name, t, str(ckpt.path))
        if plan.compute_dtype is not None:
            t = t.to(plan.compute_dtype)
        return t.to(device, non_blocking=True)

    base = load(job.base) if job.base is not None else None
    tensors = [load(src) for src in job.inputs]
    if job.rows is not None:  # a vocabulary tensor: every input's rows in the output vocabulary's order
        read = ([base] if base is not None else []) + tensors
        remapped = [r.to(t.dtype) for r, t in zip(remap_rows(job.rows, read), read, strict=True)]
        base, tensors = (remapped[0], remapped[1:]) if base is not None else (None, remapped)
    fishers = [f.to(device) for f in fisher.get(job.name, [t.shape for t in tensors])] if fisher is not None else None
    return base, tensors, fishers


#: The most bytes of mask draws (4 per entry and model) made ahead for one tensor: past it (a large model's
#: embedding) the draws are made on the spot, so that drawing ahead never adds more than this to peak memory.
DRAW_AHEAD_BYTES = 512 << 20


def _draw_ahead(plan: MergePlan, job: TensorJob, pool: ThreadPoolExecutor) -> list[Future[DrawnAhead] | None] | None:
    """Start drawing the first mask values of ``job`` (one per output entry) on ``pool`` for each model that
    draws; None (draws on the spot) when they would take more than :data:`DRAW_AHEAD_BYTES`.

    A model whose density is 1 or 0 draws nothing (DARE and DELLA keep or drop all of it), so nothing is
    drawn ahead for it: the merge would otherwise wait for a draw of the whole tensor that it never uses.
    """
    numel = math.prod(plan.output_shape(job))
    draws = [_draws_a_mask(params) for params in job.model_params]
    if 4 * numel * sum(draws) > DRAW_AHEAD_BYTES:
        return None
    return [pool.submit(DrawnAhead, partial(mask_generator, plan.mask_rng, plan.seed, job.name, k), numel)
            if draws[k] else None for k in range(len(job.inputs))]


def _draws_a_mask(params: Mapping[str, Any]) -> bool:
    """Whether a model with these (resolved) parameters draws a random mask: a density strictly inside (0, 1)."""
    density = params.get("density", 1.0)
    return not isinstance(density, (int, float)) or 0 < density < 1


def run_job(plan: MergePlan, job: TensorJob, base, tensors, fishers,
            ahead: Sequence[Future[DrawnAhead] | None] | None = None) -> torch.Tensor:
    """Merge one tensor: the method's pure function on already-loaded inputs.

    ``ahead``: model k's mask generator with its first draw made (:func:`_draw_ahead`); each model's
    first call for a generator gets it, any later call a fresh generator, as without it.
    """
    taken: set[int] = set()

    def generator(k: int) -> MaskGenerator:
        if ahead is not None and k < len(ahead) and ahead[k] is not None and k not in taken:
            taken.add(k)
            return ahead[k].result()
        return mask_generator(plan.mask_rng, plan.seed, job.name, k)

    inputs = TensorInputs(
        name=job.name,
        base=base,
        tensors=tensors,
        model_params=job.model_params,
        params=job.params,
        fishers=fishers,
        generators=generator if plan.method.uses_randomness else None,
    )
    with torch.no_grad():
        return plan.method.fn(inputs)


def iter_merged(plan: MergePlan, *, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` in plan order, reading the next job's inputs ahead."""
    dev = torch.device(device)
    with ExitStack() as stack:
        fisher = _FisherSource(plan.fisher_files, stack) if plan.fisher_files else None
        reader = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm3-read"))
        # random methods: each model's mask of the next tensor is drawn on its own thread (DrawnAhead)
        drawer = (stack.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="hm3-draw"))
                  if plan.method.uses_randomness else None)
        jobs = plan.jobs
        pending = reader.submit(_load_job_inputs, plan, jobs[0], fisher, dev) if jobs else None
        drawing = _draw_ahead(plan, jobs[0], drawer) if jobs and drawer is not None else None
        for i, job in enumerate(jobs):
            base, tensors, fishers = pending.result()
            ahead = drawing
            pending = reader.submit(_load_job_inputs, plan, jobs[i + 1], fisher, dev) if i + 1 < len(jobs) else None
            drawing = _draw_ahead(plan, jobs[i + 1], drawer) if i + 1 < len(jobs) and drawer is not None else None
            out = run_job(plan, job, base, tensors, fishers, ahead)
            del base, tensors, fishers, ahead
            if plan.out_dtype is not None:
                out = out.to(plan.out_dtype)
            _check_merged(plan, job.name, out)
            yield job.name, out


def _check_merged(plan: MergePlan, name: str, out: torch.Tensor) -> None:
    """Refuse a merged tensor holding NaN or Inf, as its inputs are refused: finite inputs and parameters can
    still overflow it (RAM+'s factor 1 + r·ρ, weights normalised by a sum near 0, a float16 ``dtype``)."""
    n_nan, n_inf = non_finite_counts(out)
    if n_nan or n_inf:
        raise ConfigError(f"merge_method {plan.method.name!r} gave NaN/Inf in tensor {name} ({n_nan} NaN, {n_inf} "
                          f"Inf values, in {out.dtype}): its parameters or dtype overflow it; change them")


def warn_without_tokenizer(source: Path, out_dir: Path) -> None:
    """Say so when the model the tokenizer is copied from has none: the output will have none either,
    and generating with it (or ``hm3 eval``) then fails later, far from the cause."""
    from hm3.checkpoint.writer import TOKENIZER_FILES

    if not any((Path(source) / f).is_file() for f in TOKENIZER_FILES if f != "generation_config.json"):
        warnings.warn(
            f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...), so the merged model "
            f"{out_dir} will have none either: copy the tokenizer into it before generating with it",
            Hm3Warning, stacklevel=3,
        )


def merge_to_disk(
    config: MergeConfig | str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    force: bool = False,
    device: str = "cpu",
    seed: int | None = None,
    config_dir: Path | None = None,
    max_shard_bytes: int = 1_000_000_000,
    progress: bool = False,
) -> MergeReport:
    """Execute a recipe and write an HF checkpoint atomically to ``out_dir``.

    ``out_dir`` may not be, contain or lie inside the recipe file or any model or Fisher file it
    reads, and an existing one is replaced (``overwrite``) only if hm3 wrote it, unless ``force``
    (:mod:`hm3.outputs`).
    """
    start = time.perf_counter()
    inputs: list[Path] = []
    source = None
    if not isinstance(config, MergeConfig):
        inputs.append(Path(config))
        source = str(config)
        config_dir = Path(config).parent if config_dir is None else config_dir
        config = load_merge_config(config)
    out_dir = Path(out_dir)
    dev = check_device(device)  # before the models are opened
    with naming(source):
        plan = plan_merge(config, config_dir=config_dir, seed=seed)
    # the recipe beside the model names the seed that drew its drop masks (``seed`` overrides the recipe's),
    # so merging that file again gives the same model
    recorded = config if seed is None else config.model_copy(update={"seed": seed})
    try:
        inputs += [c.path for c in plan.checkpoints]
        inputs += list(plan.fisher_files or [])
        tokenizer_from = plan.reference.path
        with tempfile.TemporaryDirectory(prefix="hm3-tokenizer-") as staged:  # a built tokenizer, saved
            if plan.tokenizer is not None:
                inputs.append(plan.tokenizer.source)
                tokenizer_from = plan.tokenizer.files(Path(staged))
            with CheckpointWriter(
                out_dir,
                config=plan.output_config,
                overwrite=overwrite,
                max_shard_bytes=max_shard_bytes,
                tokenizer_from=tokenizer_from,
                extra_files={"hm3_recipe.yml": recorded.to_yaml()},
                background=True,
                force=force,
                inputs=inputs,
                # output specs up front let the writer stream each tensor to disk: methods return their
                # lead input's (the base's, else the first input's) dtype after compute_dtype conversion
                layout=[
                    (
                        j.name,
                        plan.output_shape(j),
                        plan.out_dtype or plan.compute_dtype or plan.source(j.lead).dtype(j.lead.name),
                    )
                    for j in plan.jobs
                ],
            ) as writer:
                n = 0
                with progress_bar(progress, total=len(plan.jobs), desc="merge", unit="tensor") as bar, naming(source):
                    for name, tensor in iter_merged(plan, device=dev):
                        writer.add(name, tensor.cpu())
                        n += 1
                        bar.update(1)
    finally:
        plan.close()
    if plan.tokenizer is None:
        warn_without_tokenizer(tokenizer_from, out_dir)
    return MergeReport(out_dir=out_dir, tensors=n, seconds=time.perf_counter() - start)
