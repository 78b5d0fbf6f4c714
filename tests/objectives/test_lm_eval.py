"""lm-eval tasks as objectives, scored through hm3's backends, against lm-evaluation-harness's own ``HFLM``.

The tasks are local YAMLs over JSONL files written here (lm-eval's include mechanism). The oracle is
lm-eval end to end: ``simple_evaluate`` with its transformers model on the same tiny model directory must
give the same scores, per-document answers and prompts as the objective scored by hm3's hf backend.
The answers of the evaluated documents are made from a first pass over placeholder data, so that about
half are right: a wrong prompt, filter or metric on either side moves a score off the expected value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from hm3.errors import BackendError, ConfigError, DataFileError  # noqa: E402
from hm3.eval.evaluate import evaluate_objective  # noqa: E402
from hm3.eval.hf import HFBackend  # noqa: E402
from objectives import lmeval  # noqa: E402
from objectives.base import Generate, LogLikelihood  # noqa: E402
from objectives.registry import get_objective, list_objectives, parse_objectives  # noqa: E402
from tests.eval.tiny_lm import build_tiny_lm  # noqa: E402

WORDS = ["cat", "dog", "sun", "map", "red", "owl", "ink", "fig", "bee", "jam", "elk", "yak", "cup", "hat"]
GEN = {  # a generation task: regex filter, exact_match; few-shot examples from its train split
    "output_type": "generate_until", "training_split": "train", "validation_split": "validation",
    "test_split": "test", "fewshot_split": "train", "num_fewshot": 2,
    "doc_to_text": "Q: {{q}}\nA:", "doc_to_target": "{{a}}",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0.0},
    "filter_list": [{"name": "letter", "filter": [{"function": "regex", "regex_pattern": "([a-z])"},
                                                  {"function": "take_first"}]},
                    {"name": "whole", "filter": [{"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
}
MC = {  # multiple choice, no train split: lm-eval draws its few-shot examples from the validation documents
    "output_type": "multiple_choice", "validation_split": "validation", "test_split": "test", "num_fewshot": 2,
    "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "choices", "doc_to_target": "gold",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}

LL = {  # loglikelihood: lm-eval's acc here is whether the continuation is the greedy one
    "output_type": "loglikelihood", "validation_split": "validation", "test_split": "test",
    "doc_to_text": "Q: {{q}}\nA:", "doc_to_target": "{{a}}",
}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task(folder: Path, name: str, body: dict, files: dict[str, str], **extra) -> None:
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, **body, **extra}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _gen_rows(words: list[str], answer=lambda i: "#") -> list[dict]:
    """Documents (question, answer); ``right`` marks the answers made from the model's own (for the tests)."""
    return [{"q": w, "a": answer(i), "right": answer(i) != "#"} for i, w in enumerate(words)]


def _mc_rows(words: list[str], gold=lambda i: 0) -> list[dict]:
    return [{"q": w, "choices": [w[::-1], w.upper(), w + "s"], "gold": gold(i)} for i, w in enumerate(words)]


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """datasets writes its Arrow copies of the JSONL files here, not into the user's cache."""
    from datasets import config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("lmeval") / "model", seed=3)


@pytest.fixture(scope="module")
def hf(model) -> HFBackend:
    return HFBackend.from_pretrained(model, batch_size=8)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, model, hf) -> Path:
    """The task folder. Probe tasks hold placeholder answers; hm3_gen, hm3_mc and hm3_ll hold answers made
    from the probes' outputs through hm3's hf backend: right for even documents (where the filter found
    anything, or the model's next character is visible), wrong for odd ones."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "data"
    data.mkdir()
    train = _jsonl(data / "train.jsonl", _gen_rows(WORDS[:6], lambda i: "abcdef"[i]))
    gen_val, gen_test = WORDS[6:], WORDS[1:11]
    gv, gt, mv, mt, one, small = (str(data / f"{n}.jsonl") for n in ("gv", "gt", "mv", "mt", "one", "small"))
    _jsonl(data / "mv.jsonl", _mc_rows(WORDS[:7], lambda i: i % 3))
    _jsonl(data / "one.jsonl", _gen_rows(WORDS))
    _jsonl(data / "small.jsonl", _gen_rows(gen_test))
    # every YAML first: lm-eval indexes the folder once (gv/gt/mt, their data, are written below)
    _task(folder, "hm3_gen_probe", GEN, {"train": train, "validation": _jsonl(data / "gv0.jsonl", _gen_rows(gen_val)),
                                         "test": _jsonl(data / "gt0.jsonl", _gen_rows(gen_test))})
    _task(folder, "hm3_mc_probe", MC, {"validation": mv, "test": _jsonl(data / "mt0.jsonl", _mc_rows(WORDS[5:13]))})
    _task(folder, "hm3_gen", GEN, {"train": train, "validation": gv, "test": gt})
    _task(folder, "hm3_mc", MC, {"validation": mv, "test": mt})
    _task(folder, "hm3_ll_probe", LL, {"validation": _jsonl(data / "lv.jsonl", _gen_rows(WORDS[:4])),
                                       "test": _jsonl(data / "lt0.jsonl", _gen_rows(WORDS[4:]))})
    _task(folder, "hm3_ll", LL, {"validation": str(data / "lv.jsonl"), "test": str(data / "lt.jsonl")})
    _task(folder, "hm3_gen_val", GEN, {"train": train, "validation": gv}, test_split="validation")
    _task(folder, "hm3_mc_val", MC, {"validation": mv}, test_split="validation", fewshot_split="validation")
    _task(folder, "hm3_one", GEN, {"test": one}, training_split=None, validation_split=None, fewshot_split=None,
          num_fewshot=1)
    _task(folder, "hm3_zero", GEN, {"train": train, "test": small}, validation_split=None, num_fewshot=0)
    _task(folder, "hm3_sampled", GEN, {"train": train, "test": small}, validation_split=None,
          generation_kwargs={"until": ["\n"], "do_sample": True, "temperature": 0.7})
    _task(folder, "hm3_rolling", {"output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
                                  "doc_to_target": "{{q}}"}, {"test": small})
    (folder / "absent.yaml").write_text(yaml.safe_dump({"task": "hm3_absent", "dataset_path": "hm3-test/absent-data",
                                                        "output_type": "generate_until", "test_split": "test",
                                                        "doc_to_text": "{{q}}", "doc_to_target": "{{a}}"}))
    (folder / "group.yaml").write_text(yaml.safe_dump({"group": "hm3_pair", "task": ["hm3_gen", "hm3_mc"]}))

    def letter(outputs, i):
        return outputs[i] if i % 2 == 0 and outputs[i] != "[invalid]" else "#"

    probe = get_objective(f"lm-eval:hm3_gen_probe,include_path={folder}")
    val_out, test_out = (evaluate_objective(hf, probe, split).outputs for split in ("validation", "test"))
    _jsonl(Path(gv), _gen_rows(gen_val, lambda i: letter(val_out, i)))
    _jsonl(Path(gt), _gen_rows(gen_test, lambda i: letter(test_out, i)))
    mc_probe = get_objective(f"lm-eval:hm3_mc_probe,include_path={folder}")
    picked = [e.choices.index(o) for e, o in zip(mc_probe.examples("test"),
                                                 evaluate_objective(hf, mc_probe, "test").outputs, strict=True)]
    _jsonl(Path(mt), _mc_rows(WORDS[5:13], lambda i: picked[i] if i % 2 == 0 else (picked[i] + 1) % 3))
    prompts = [e.prompt for e in get_objective(f"lm-eval:hm3_ll_probe,include_path={folder}").examples("test")]
    greedy = [c if c.strip() else "" for c in hf.generate(prompts, max_new_tokens=1)]  # the model's next character
    right = [i % 2 == 0 and bool(c) for i, c in enumerate(greedy)]
    _jsonl(data / "lt.jsonl", [{"q": w, "a": c if ok else "$" if c == "#" else "#", "right": ok}
                               for w, c, ok in zip(WORDS[4:], greedy, right, strict=True)])
    return folder


@pytest.fixture(scope="module")
def harness_run(tasks, model) -> dict:
    """lm-eval end to end on hm3_gen and hm3_mc: its own HFLM on the model directory, simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model), device="cpu", batch_size=8, dtype="float32")
    return simple_evaluate(model=lm, tasks=["hm3_gen", "hm3_mc", "hm3_ll"], bootstrap_iters=0, log_samples=True,
                           task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


def _right_share(tasks: Path, data: str) -> float:
    """The share of a data file's documents whose answer the fixture made right."""
    rows = [json.loads(line) for line in (tasks / "data" / f"{data}.jsonl").read_text().splitlines()]
    return sum(r["right"] for r in rows) / len(rows)


def _samples(run: dict, task: str) -> list[dict]:
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def test_generation_task_scores_exactly_as_lm_eval_does(tasks, hf, harness_run):
    objective = get_objective(f"lm-eval:hm3_gen,include_path={tasks}")
    assert (objective.name, objective.metric, objective.filter) == ("lm-eval:hm3_gen", "exact_match", "letter")
    assert objective.decoding == Generate(max_new_tokens=6, stop=("\n",))
    result = evaluate_objective(hf, objective, "test")
    theirs = harness_run["results"]["hm3_gen"]["exact_match,letter"]
    assert result.score == theirs == _right_share(tasks, "gt")
    assert 0.2 <= result.score <= 0.5  # some answers right, the odd ones wrong
    samples = [s for s in _samples(harness_run, "hm3_gen") if s["filter"] == "letter"]
    examples = objective.examples("test")
    assert [e.prompt for e in examples] == [s["arguments"][0][0] for s in samples]  # lm-eval's own prompts
    assert list(result.outputs) == [s["filtered_resps"][0] for s in samples]
    # a subset (as first-N limits and DAR subsets ask for) is scored over those documents alone
    subset = [7, 2, 4, 0]
    part = evaluate_objective(hf, objective, "test", subset)
    assert part.score == sum(samples[i]["exact_match"] for i in subset) / len(subset)
    assert part.example_ids == tuple(examples[i].id for i in subset)
    # the other filter of the task, by name: the raw generation must equal the target as a whole
    whole = evaluate_objective(hf, get_objective(f"lm-eval:hm3_gen,filter=whole,include_path={tasks}"), "test")
    assert whole.score == harness_run["results"]["hm3_gen"]["exact_match,whole"]


def test_multiple_choice_task_scores_exactly_as_lm_eval_does(tasks, hf, harness_run):
    objective = get_objective(f"lm-eval:hm3_mc,include_path={tasks}")
    assert (objective.metric, objective.filter, objective.decoding) == ("acc", "none", LogLikelihood())
    result = evaluate_objective(hf, objective, "test")
    theirs = harness_run["results"]["hm3_mc"]
    assert result.score == theirs["acc,none"] == 0.5  # gold is the model's pick for even documents only
    normed = get_objective(f"lm-eval:hm3_mc,metric=acc_norm,include_path={tasks}")
    assert normed.name == "lm-eval:hm3_mc/acc_norm"
    assert evaluate_objective(hf, normed, "test").score == theirs["acc_norm,none"]
    samples = _samples(harness_run, "hm3_mc")
    examples = objective.examples("test")
    assert [e.prompt for e in examples] == [s["arguments"][0][0] for s in samples]
    chosen = [e.choices[max(range(3), key=lambda k: s["filtered_resps"][k][0])] for e, s in zip(examples, samples,
                                                                                                  strict=True)]
    assert list(result.outputs) == chosen
    assert examples[0].choices == (" " + WORDS[5][::-1], " " + WORDS[5].upper(), " " + WORDS[5] + "s")


@pytest.mark.parametrize(("spec", "task", "metric"), [("hm3_gen", "hm3_gen", "exact_match"),
                                                     ("hm3_mc,metric=acc_norm", "hm3_mc", "acc_norm")])
def test_logged_samples_hold_lm_evals_own_filtered_responses_and_metrics(tasks, hf, harness_run, tmp_path, spec,
                                                                         task, metric):
    """--log-samples on an lm-eval objective: per document, the filtered response and the metric's value
    that lm-eval's own log_samples gives, averaging to the score; the name's '/' stays inside the folder."""
    from hm3.samples import SampleLog, jsonable, read_samples

    objective = get_objective(f"lm-eval:{spec},include_path={tasks}")
    plain = evaluate_objective(hf, objective, "test")
    result = evaluate_objective(hf, objective, "test", samples=True)
    assert result.score == plain.score and plain.samples is None
    theirs = [s for s in _samples(harness_run, task) if s["filter"] == objective.filter]
    records = result.samples
    assert [r["output"] for r in records] == list(plain.outputs)
    assert [r["prompt"] for r in records] == [s["arguments"][0][0] for s in theirs]
    mine, oracle = [_flat(r["filtered_response"]) for r in records], [_flat(jsonable(s["filtered_resps"])) for s in theirs]
    assert [[type(v) for v in m] for m in mine] == [[type(v) for v in o] for o in oracle]
    for m, o in zip(mine, oracle, strict=True):  # texts and greedy flags exactly; log-likelihoods to float noise
        assert m == [pytest.approx(v, abs=1e-4) if isinstance(v, float) else v for v in o]
    assert [r["score"] for r in records] == [s[metric] for s in theirs]
    assert sum(r["score"] for r in records) / len(records) == pytest.approx(result.score, abs=1e-12)
    path = SampleLog(tmp_path, [objective.name]).write(objective.name, "test", records, 0)
    assert path.parent == tmp_path / "0" and read_samples(path)[0]["objective"] == objective.name


def _flat(value) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


def test_loglikelihood_task_scores_greedy_continuations_exactly_as_lm_eval_does(tasks, hf, harness_run):
    objective = get_objective(f"lm-eval:hm3_ll,include_path={tasks}")
    assert objective.metric == "acc"  # the first metric where higher is better (perplexity is lower-better)
    result = evaluate_objective(hf, objective, "test")
    assert result.score == harness_run["results"]["hm3_ll"]["acc,none"] == _right_share(tasks, "lt")
    assert 0.2 <= result.score <= 0.5


def test_a_lower_is_better_metric_is_stored_raw_as_lm_eval_scores_it_and_ranked_by_its_utility(
        tasks, hf, harness_run, tmp_path):
    """lm-eval's loglikelihood perplexity (exp of minus the mean log-likelihood, unbounded): hm3's score is
    HFLM's, the store keeps it, and the scorer hands on -raw, so the merge with the lower perplexity ranks
    higher. The second "merge" is the model with its embedding scaled, which changes every log-likelihood."""
    import math

    from hm3.search.scoring import CandidateScorer, SplitPlan
    from hm3.store import RunStore

    objective = get_objective(f"lm-eval:hm3_ll,metric=perplexity,include_path={tasks}")
    assert (objective.higher_is_better, objective.bounded) == (False, False)
    result = evaluate_objective(hf, objective, "test")
    assert result.score == pytest.approx(harness_run["results"]["hm3_ll"]["perplexity,none"], rel=1e-6)
    lls = hf.loglikelihood([(e.prompt, e.target) for e in objective.examples("test")])
    assert result.score == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-6) and result.score > 1.0
    plan = SplitPlan("test", {objective.name: list(range(len(objective.examples("test"))))})
    original = {n: p.detach().clone() for n, p in hf.live_parameters().items()}
    scaled = {n: p * 0.5 if "embed_tokens" in n else p for n, p in original.items()}
    try:
        with RunStore.open(tmp_path / "run", config={"x": 1}) as store:
            scorer = CandidateScorer(hf, [objective], store)
            refs = [store.add_candidate({"merge": k}, "merge") for k in ("original", "scaled")]
            utilities = [scorer.score(ref, lambda s=s: hf.load_state(s), plan)[0]
                         for ref, s in zip(refs, (original, scaled), strict=True)]
            raws = [store.get_evaluation(ref, objective.name, "test", [e.id for e in objective.examples("test")]).score
                    for ref in refs]
    finally:
        hf.load_state(original)
    assert raws[0] == pytest.approx(result.score) and raws[0] != pytest.approx(raws[1])
    assert utilities == [-raws[0], -raws[1]]
    assert (utilities[0] > utilities[1]) == (raws[0] < raws[1])  # the lower perplexity has the higher utility


# --- inputs longer than the model reads --------------------------------------------------------------

SHORT_POSITIONS = 24  # the short model's max_position_embeddings; the tokenizer has one token per character


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny model that reads at most SHORT_POSITIONS tokens, a folder of two tasks whose prompts are
    longer than that): a loglikelihood task and a generation task."""
    model = build_tiny_lm(tmp_path_factory.mktemp("short") / "model", seed=5)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": SHORT_POSITIONS}))
    folder = tmp_path_factory.mktemp("long_tasks")
    rows = [{"q": (w + " ") * (4 + i), "a": w[::-1] + " " + w, "right": False} for i, w in enumerate(WORDS[:6])]
    data = _jsonl(folder / "long.jsonl", rows)
    long_prompt = {"doc_to_text": "Question about {{q}} and once more {{q}}\nA:", "doc_to_target": "{{a}}",
                   "test_split": "test", "num_fewshot": 0}
    _task(folder, "hm3_long_ll", {**long_prompt, "output_type": "loglikelihood"}, {"test": data})
    _task(folder, "hm3_long_gen", {**long_prompt, "output_type": "generate_until",
                                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
                                   "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                    "higher_is_better": True}]}, {"test": data})
    _task(folder, "hm3_long_roll", {"output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
                                    "doc_to_target": "{{q}}{{a}} {{q}}{{a}} {{q}}"}, {"test": data})
    _task(folder, "hm3_long_gen24", {**long_prompt, "output_type": "generate_until",
                                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": SHORT_POSITIONS}},
          {"test": data})
    return model, folder


def test_a_prompt_that_writes_the_bos_text_itself_gets_no_second_bos_as_in_lm_evals_hflm(model, hf):
    """A template may write the BOS text (``<s>`` here) at the start of a prompt; HFLM then encodes it
    without special tokens (``has_bos_prefix``). The adapter's encodings, log-likelihoods and generations
    equal HFLM's on such prompts and on plain ones, and a prompt with and without the written BOS is one
    input: a second BOS would change the model's scores."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from hm3.eval.backend import encode_prompt
    from hm3.eval.harness import BackendLM

    lm = HFLM(pretrained=str(model), device="cpu", batch_size=4, dtype="float32")
    bos = hf.tokenizer.bos_token
    texts = [bos + "hello", "hello", bos + "q: cat", "<s", ""]
    assert [encode_prompt(hf.tokenizer, t) for t in texts] == [lm.tok_encode(t) for t in texts]
    assert encode_prompt(hf.tokenizer, bos + "hello") == encode_prompt(hf.tokenizer, "hello")
    pairs = [(bos + "hello", " world"), ("hello", " world"), (bos + "q: cat", " a"), (bos, "dog")]
    ours = BackendLM(hf).loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-5, abs=1e-5)
    assert ours[0][0] == pytest.approx(ours[1][0], rel=1e-6, abs=1e-6)
    until = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    for prompt in (bos + "q: dog", "q: dog"):  # one prompt per call: HFLM decides per batch by its first prompt
        request = [Instance("generate_until", {}, (prompt, until), 0)]
        assert BackendLM(hf).generate_until(request) == lm.generate_until(request)


def test_inputs_longer_than_the_model_reads_are_left_truncated_as_lm_evals_hflm_does(short):
    """HFLM on the same model (max_length from its config: SHORT_POSITIONS) scores and generates on the
    last tokens of each over-long input; hm3 gives the same answers, and different ones where it reads the
    whole input, so the truncation is what makes them agree."""
    import math

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, folder = short
    hm3 = HFBackend.from_pretrained(model, batch_size=4)
    assert hm3.max_length == SHORT_POSITIONS
    run = simple_evaluate(model=HFLM(pretrained=str(model), device="cpu", batch_size=4, dtype="float32"),
                          tasks=["hm3_long_ll", "hm3_long_gen"], bootstrap_iters=0, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    ll = get_objective(f"lm-eval:hm3_long_ll,metric=perplexity,include_path={folder}")
    gen = get_objective(f"lm-eval:hm3_long_gen,include_path={folder}")
    examples = ll.examples("test")  # the task's one split is divided: these are some of its documents
    assert all(len(hm3.tokenizer(e.prompt)["input_ids"]) > 2 * SHORT_POSITIONS for e in examples)
    by_prompt = {s["arguments"][0][0]: s["resps"][0][0] for s in _samples(run, "hm3_long_ll")}
    theirs = [by_prompt[e.prompt] for e in examples]
    ours = hm3.greedy_loglikelihood([(e.prompt, e.target) for e in examples])
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], rel=1e-5, abs=1e-5)
    assert evaluate_objective(hm3, ll, "test").score == pytest.approx(math.exp(-sum(s for s, _ in theirs) / len(theirs)),
                                                                      rel=1e-6)
    generated = evaluate_objective(hm3, gen, "test").outputs
    by_prompt = {s["arguments"][0][0]: s["resps"][0][0] for s in _samples(run, "hm3_long_gen")}
    assert list(generated) == [by_prompt[e.prompt] for e in gen.examples("test")]
    hm3.max_length = 10_000  # read everything (a Llama's rotary positions go on past its configured length)
    whole = hm3.greedy_loglikelihood([(e.prompt, e.target) for e in examples])
    assert all(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(whole, ours, strict=True))
    assert evaluate_objective(hm3, gen, "test").outputs != generated


def test_rolling_perplexities_over_documents_longer_than_the_model_reads_are_lm_evals(short):
    """A loglikelihood_rolling task (wikitext's kind) over documents of several of the model's windows: word
    and byte perplexity and bits per byte as HFLM computes them, each a lower-is-better unbounded objective."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hm3.eval.harness import BackendLM

    model, folder = short
    hm3 = HFBackend.from_pretrained(model, batch_size=4)
    run = simple_evaluate(model=HFLM(pretrained=str(model), device="cpu", batch_size=4, dtype="float32"),
                          tasks=["hm3_long_roll"], bootstrap_iters=0, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    default = get_objective(f"lm-eval:hm3_long_roll,include_path={folder}")
    assert default.metric == "word_perplexity" and (default.higher_is_better, default.bounded) == (False, False)
    examples = default.examples("test")
    assert all(len(hm3.tokenizer(e.target)["input_ids"]) > 2 * SHORT_POSITIONS for e in examples)
    theirs = {s["arguments"][0][0]: s["resps"][0][0] for s in _samples(run, "hm3_long_roll")}
    answered = default.requests(examples)
    ours = BackendLM(hm3).loglikelihood_rolling([made[0] for made in answered])
    assert ours == pytest.approx([theirs[e.target] for e in examples], rel=1e-5)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        objective = get_objective(f"lm-eval:hm3_long_roll,metric={metric},include_path={folder}")
        # HFLM's result is over the task's whole split; the objective scores the hashed half, so the metric
        # is recomputed from HFLM's own per-document values with lm-eval's aggregation
        values = [s[metric] for s in _samples(run, "hm3_long_roll")
                  if s["arguments"][0][0] in {e.target for e in examples}]
        expected = objective.task.aggregation()[metric]([tuple(v) for v in values])
        assert evaluate_objective(hm3, objective, "test").score == pytest.approx(expected, rel=1e-5)


def test_requests_that_cannot_fit_in_what_the_model_reads_are_refused(short):
    model, folder = short
    hm3 = HFBackend.from_pretrained(model, batch_size=4)
    with pytest.raises(BackendError, match="lm-eval task 'hm3_long_gen24' generates up to 24 tokens, but the model "
                                           "reads at most 24: no room is left for the prompt"):
        evaluate_objective(hm3, get_objective(f"lm-eval:hm3_long_gen24,include_path={folder}"), "test")
    with pytest.raises(BackendError, match="a continuation of 25 tokens cannot be scored by a model that reads at most 24"):
        hm3.loglikelihood([("a", "b" * (SHORT_POSITIONS + 1))])


@pytest.mark.vllm
def test_vllm_truncates_long_generation_prompts_as_hf_does_and_refuses_long_loglikelihoods(short):
    """vLLM reads the same last tokens of a long generation prompt; a log-likelihood over more tokens than
    the engine reads cannot be truncated as HFLM does (its window is one token longer), so it is refused,
    and so are rolling log-likelihoods."""
    pytest.importorskip("vllm")
    from hm3.eval.backend import open_backend

    model, folder = short
    gen = get_objective(f"lm-eval:hm3_long_gen,include_path={folder}")
    engine = open_backend("vllm", model, batch_size=4)
    try:
        assert engine.max_length == SHORT_POSITIONS
        ours, theirs = (evaluate_objective(b, gen, "test") for b in (HFBackend.from_pretrained(model), engine))
        assert theirs.outputs == ours.outputs
        fits = [("a" * 20, "bc")]  # BOS + 22 characters, and the token the engine must generate
        assert engine.loglikelihood(fits) == pytest.approx(HFBackend.from_pretrained(model).loglikelihood(fits), abs=1e-4)
        with pytest.raises(BackendError, match="request of 24 tokens does not fit the vllm engine, which reads at most "
                                               "24 tokens including one it generates"):
            engine.loglikelihood([("a" * 21, "bc")])
        rolling = get_objective(f"lm-eval:hm3_long_roll,include_path={folder}")
        with pytest.raises(BackendError, match="vllm backend cannot serve lm-eval's loglikelihood_rolling requests"):
            evaluate_objective(engine, rolling, "test")
    finally:
        engine.close()


def _lm_eval_prompts(tasks: Path, name: str) -> list[str]:
    """lm-eval's own requests for a task's evaluated documents, built as simple_evaluate builds them."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(tasks), include_defaults=False).load([name])["tasks"][name]
    task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    task.build_all_requests()
    return [i.args[0] for i in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)) if i.idx == 0]


def test_validation_split_is_the_tasks_validation_documents_with_lm_evals_prompts(tasks):
    """As lm-eval builds them when it evaluates the validation documents (a YAML saying test_split: validation);
    where the few-shot pool is those documents, a document never shows up in its own prompt."""
    gen = get_objective(f"lm-eval:hm3_gen,include_path={tasks}")
    assert [e.prompt for e in gen.examples("validation")] == _lm_eval_prompts(tasks, "hm3_gen_val")
    mc = get_objective(f"lm-eval:hm3_mc,include_path={tasks}")
    validation = mc.examples("validation")
    assert [e.prompt for e in validation] == _lm_eval_prompts(tasks, "hm3_mc_val")
    for example, word in zip(validation, WORDS[:7], strict=True):
        assert example.prompt.count(f"Q: {word}\n") == 1  # its own question, never a few-shot example
    assert len(validation) == 7 and {e.id for e in validation}.isdisjoint(e.id for e in mc.examples("test"))


def test_a_one_split_task_is_divided_by_seed_keeping_lm_evals_prompts(tasks):
    prompts = _lm_eval_prompts(tasks, "hm3_one")
    divisions = []
    for seed in (0, 1):
        objective = get_objective(f"lm-eval:hm3_one,include_path={tasks}" + (f"@{seed}" if seed else ""))
        assert objective.name == "lm-eval:hm3_one" + (f"@{seed}" if seed else "")
        validation, test = objective.examples("validation"), objective.examples("test")
        indices = {split: [int(e.id.split(":")[1]) for e in examples]
                   for split, examples in (("validation", validation), ("test", test))}
        assert sorted(indices["validation"] + indices["test"]) == list(range(len(WORDS)))  # disjoint, complete
        assert indices["validation"] and indices["test"]
        for split, examples in (("validation", validation), ("test", test)):
            # each document's prompt is the one lm-eval gives it when it evaluates the whole split
            assert [e.prompt for e in examples] == [prompts[i] for i in indices[split]]
        divisions.append(indices["validation"])
    assert divisions[0] != divisions[1]


def test_scores_are_stored_and_found_in_the_run_store(tasks, hf, tmp_path):
    from hm3.search.scoring import CandidateScorer, SplitPlan
    from hm3.store import RunStore

    objective = get_objective(f"lm-eval:hm3_mc,include_path={tasks}")
    plan = SplitPlan("test", {objective.name: [3, 1, 6]})
    installs = []
    with RunStore.open(tmp_path / "run", config={"x": 1}) as store:
        ref = store.add_candidate({"reference_model": "base"}, "reference")
        scorer = CandidateScorer(hf, [objective], store)
        first = scorer.score(ref, lambda: installs.append(1), plan)
        again = scorer.score(ref, lambda: installs.append(1), plan)
        assert installs == [1] and scorer.evaluated_examples == 3 and scorer.cache_hits == 1
        assert first.tolist() == again.tolist() == [evaluate_objective(hf, objective, "test", [3, 1, 6]).score]
        assert store.evaluations(ref, objective.name, "test")[0].count == 3


# --- specs, names, lists ------------------------------------------------------------------------------


def test_specs_and_names():
    spec = lmeval.parse_spec("arc_easy, metric=acc_norm ,filter=none,num_fewshot=5", seed=2)
    assert spec == lmeval.LmEvalSpec("arc_easy", metric="acc_norm", filter="none", num_fewshot=5, seed=2)
    assert spec.objective_name() == "lm-eval:arc_easy/none/acc_norm/5shot@2"
    assert lmeval.parse_spec("arc_easy,name=arc,include_path=/x").objective_name() == "arc"
    for rest, message in [
        ("", "names no task"), ("metric=acc", "names no task"), ("t,metrc=acc", "cannot read option 'metrc=acc'"),
        ("t,acc", "cannot read option 'acc'"), ("t,metric=a,metric=b", "gives metric= twice"),
        ("t,filter=", "option filter= is empty"), ("t,num_fewshot=-1", "num_fewshot must be a whole number"),
        ("t,name=a b", "may not hold spaces"),
    ]:
        with pytest.raises(ConfigError, match=message):
            lmeval.parse_spec(rest)


def test_objective_lists_keep_lm_eval_options_with_their_spec(tasks):
    objectives = parse_objectives(f"lm-eval:hm3_gen,include_path={tasks},num_fewshot=1,filter=whole,"
                                  f"lm-eval:hm3_mc,include_path={tasks},name=mc")
    assert [o.name for o in objectives] == ["lm-eval:hm3_gen/whole/1shot", "mc"]
    assert objectives[0].examples("test")[0].prompt.count("Q: ") == 2  # one few-shot example, then the question
    from hm3.request import short_name

    assert short_name("lm-eval:hm3_gen/whole") == "hm3_gen/whole" and short_name("mc") == "mc"


def test_the_objectives_list_names_the_lm_eval_family():
    rows = dict(list_objectives())
    assert "lm-eval ls tasks" in rows["lm-eval:TASK[,K=V...]"] and lmeval.SPEC_PATTERN in rows["lm-eval:TASK[,K=V...]"]


# --- refusals -----------------------------------------------------------------------------------------


@pytest.fixture
def small_defaults(tasks, tmp_path, monkeypatch):
    """lm-eval's own task index stands in as a folder of two tasks (reading all of lm-eval's takes long)."""
    from lm_eval.tasks import TaskManager

    defaults = tmp_path / "defaults"
    defaults.mkdir()
    for name in ("arc_easy", "hm3_genx"):
        (defaults / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, "dataset_path": "x", "doc_to_text": "q"}))

    def manager(include, with_defaults):
        paths = [defaults, include] if with_defaults else [include]
        return TaskManager(include_path=[p for p in paths if p], include_defaults=False)

    monkeypatch.setattr(lmeval, "_task_manager", manager)


@pytest.mark.parametrize(("spec", "error", "message"), [
    ("lm-eval:hm3_gne,include_path=TASKS", ConfigError,
     r"unknown lm-eval task 'hm3_gne': not among lm-eval's tasks or .*; did you mean .*hm3_gen, hm3_genx"),
    ("lm-eval:hm3_gen,metric=acc,include_path=TASKS", ConfigError,
     r"lm-eval task 'hm3_gen' reports metrics exact_match, not 'acc'"),
    ("lm-eval:hm3_gen,filter=strict,include_path=TASKS", ConfigError, r"has filters letter, whole, not 'strict'"),
    ("lm-eval:hm3_ll,metric=word_perplexity,include_path=TASKS", ConfigError,
     r"lm-eval task 'hm3_ll' reports metrics perplexity, acc, not 'word_perplexity' \(did you mean perplexity\?\)"),
    ("lm-eval:hm3_absent,include_path=TASKS", DataFileError,
     r"lm-eval task 'hm3_absent' cannot read its data offline .*download dataset 'hm3-test/absent-data' where there "
     r"is network, e\.g\. python -c \"import datasets; datasets\.load_dataset\('hm3-test/absent-data'\)\""),
    ("lm-eval:hm3_sampled,include_path=TASKS", ConfigError, r"generation settings sample .*decode greedily"),
    ("lm-eval:hm3_pair,include_path=TASKS", ConfigError, r"lm-eval:hm3_pair is a group of 2 tasks \(hm3_gen, hm3_mc\)"),
    ("lm-eval:hm3_zero,num_fewshot=3,include_path=TASKS", ConfigError, r"fixes num_fewshot: 0 .*num_fewshot=3"),
    ("lm-eval:hm3_gen,include_path=NOWHERE", ConfigError, r"include_path .*nowhere is not a folder"),
])
def test_bad_objectives_are_refused_with_what_to_do(small_defaults, tasks, spec, error, message):
    with pytest.raises(error, match=message):
        get_objective(spec.replace("TASKS", str(tasks)).replace("NOWHERE", str(tasks / "nowhere")))


def test_a_backend_without_greedy_loglikelihood_is_refused_naming_the_request_type(tasks):
    class TextOnly:
        name = "text-only"

        def generate(self, prompts, *, max_new_tokens, stop=()):
            return ["a"] * len(prompts)

    mc = get_objective(f"lm-eval:hm3_mc,include_path={tasks}")
    with pytest.raises(BackendError, match="text-only backend cannot tell .*loglikelihood and multiple_choice"):
        evaluate_objective(TextOnly(), mc, "test")
    gen = evaluate_objective(TextOnly(), get_objective(f"lm-eval:hm3_gen,include_path={tasks}"), "test")
    assert gen.outputs == ("a",) * 10  # generation needs nothing more


@pytest.mark.slow
def test_lm_evals_own_tasks_are_found_and_unknown_names_get_suggestions():
    """The real index of lm-eval's tasks (seconds to read); gsm8k's data is not in this test's empty cache."""
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'gsm8kk'.*did you mean gsm8k"):
        get_objective("lm-eval:gsm8kk")
    with pytest.raises(DataFileError, match=r"download dataset 'openai/gsm8k' \(config 'main'\)"):
        get_objective("lm-eval:gsm8k")


@pytest.mark.slow
@pytest.mark.vllm
def test_hf_and_vllm_agree_through_the_adapter(tasks, model, hf):
    pytest.importorskip("vllm")
    from hm3.eval.backend import open_backend

    engine = open_backend("vllm", model, batch_size=8)
    try:
        for spec in ("hm3_gen", "hm3_mc"):
            objective = get_objective(f"lm-eval:{spec},include_path={tasks}")
            for split in ("validation", "test"):
                ours, theirs = (evaluate_objective(b, objective, split) for b in (hf, engine))
                assert (theirs.score, theirs.outputs) == (ours.score, ours.outputs)
        requests = [("Q: cat\nA:", " tac"), ("", "abc"), ("x", " y")]
        both = [b.greedy_loglikelihood(requests) for b in (hf, engine)]
        assert [g for _, g in both[0]] == [g for _, g in both[1]]
        assert [s for s, _ in both[1]] == pytest.approx([s for s, _ in both[0]], rel=1e-4, abs=1e-4)
    finally:
        engine.close()
