"""The evaluation session: the typed interface searches score through, and its in-process implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hm3.arch.path import LayerPath
from hm3.config import parse_merge_config
from hm3.eval.live import LiveModelSession
from hm3.eval.session import (
    EvaluationSession,
    MergeCandidate,
    PathCandidate,
    ReferenceCandidate,
)
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore


def _config(tiny_family) -> dict:
    _, models, objectives = tiny_family
    return {
        "models": models,
        "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "evaluation": {"validation_examples": 8, "test_examples": 8, "batch_size": 16},
    }


def _recipe(w1: float, w2: float) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "m1", "parameters": {"weight": w1}}, {"model": "m2", "parameters": {"weight": w2}}]}


def test_sessions_side_by_side_each_hold_their_own_model(tiny_family, tmp_path):
    """Two sessions in one process: each scores through the store, and installing a candidate in one
    leaves the other's live model as it was (nothing is shared through module state)."""
    cfg = parse_run_config(_config(tiny_family))
    with RunStore.open(tmp_path / "a") as store_a, RunStore.open(tmp_path / "b") as store_b:
        a = LiveModelSession(cfg, store_a, log=lambda m: None)
        b = LiveModelSession(cfg, store_b, log=lambda m: None)
        try:
            assert isinstance(a, EvaluationSession)
            x, y = MergeCandidate(_recipe(0.8, 0.1)), MergeCandidate(_recipe(0.1, 0.9))
            a_x = a.score(x, a.validation)
            b_y = b.score(y, b.validation)
            # a's model still holds merge x: the same weights as merging x afresh, not y's
            expected = a.merger.merged_state(parse_merge_config(_recipe(0.8, 0.1)))
            live_a = a.backend.live_parameters()
            assert all(torch.equal(live_a[n], expected[n]) for n in expected)
            assert a.backend.model is not b.backend.model
            # each session scores the other's candidate to the same numbers (the scores are the models')
            assert np.array_equal(b.score(x, b.validation).scores, a_x.scores)
            assert np.array_equal(a.score(y, a.validation).scores, b_y.scores)
            # a second request for the same scores is a store hit: nothing is evaluated again
            done = a.evaluated_examples
            again = a.score(x, a.validation)
            assert a.evaluated_examples == done and again.candidate == a_x.candidate
            assert np.array_equal(a.stored_scores(a_x.candidate, a.validation), a_x.scores)
            assert a.stored_scores(a_x.candidate, a.test) is None
        finally:
            a.close()
            b.close()


def test_paths_score_as_their_models(tiny_family, tmp_path):
    """A path through all of the frame's layers in order is the frame itself: framed by the base it
    scores as the base reference, framed by a stored merge as that merge."""
    cfg = parse_run_config(_config(tiny_family))
    with RunStore.open(tmp_path / "r") as store:
        session = LiveModelSession(cfg, store, log=lambda m: None)
        try:
            layout = session.pool_layout()
            assert layout.experts == ("m1", "m2") and layout.size == 3 and layout.max_hops is None
            frame_itself = LayerPath.of_model(layout.size - 1, layout.num_layers)
            via_base = session.score(PathCandidate(frame_itself, "base", layout.experts), session.validation)
            # a merge scored after a path: the live model is back in the backend, with the merge in it
            merge = session.score(MergeCandidate(_recipe(0.7, 0.4)), session.validation)
            via_merge = session.score(PathCandidate(frame_itself, merge.candidate.id, layout.experts),
                                      session.validation)
            assert via_base.candidate.kind == via_merge.candidate.kind == "path"
            np.testing.assert_allclose(via_merge.scores, merge.scores, atol=1e-6)
            base = session.score(ReferenceCandidate("base"), session.validation).scores
            np.testing.assert_allclose(via_base.scores, base, atol=1e-6)
            assert not np.allclose(merge.scores, base)  # the two frames are told apart
            assert session.layer_features(["base", merge.candidate.id]).shape[:2] == (3, layout.num_layers)
        finally:
            session.close()


def test_a_path_over_other_experts_is_refused(tiny_family, tmp_path):
    cfg = parse_run_config(_config(tiny_family))
    with RunStore.open(tmp_path / "r") as store:
        session = LiveModelSession(cfg, store, log=lambda m: None)
        try:
            wrong = PathCandidate(LayerPath.of_model(0, 2), "base", ("m2", "m1"))
            with pytest.raises(Exception, match="cannot run on this session's pool"):
                session.score(wrong, session.validation)
        finally:
            session.close()


def test_a_fisher_weighted_recipe_names_the_fisher_of_each_scaled_expert(tiny_family, tmp_path):
    """DF-Merge's F_i(λ_i): the Fisher of θ_base + λ_i τ_i at λ_i on the coefficient grid, on the first
    ``fisher.examples`` validation examples of the objective the model is the expert of; the merge itself
    keeps the exact λ_i. Checked against a Fisher of a scaled model built here from the checkpoints."""
    from transformers import AutoModelForCausalLM

    from hm3.fisher import diagonal_fisher, load_fisher
    from objectives.registry import get_objective

    _, models, objectives = tiny_family
    data = _config(tiny_family)
    data["search_space"] |= {"fisher": True, "df_merge": True}
    data |= {"experts": {"m1": objectives[1], "m2": objectives[0]}, "fisher": {"examples": 5}}
    cfg = parse_run_config(data)
    with RunStore.open(tmp_path / "r") as store:
        session = LiveModelSession(cfg, store, log=lambda m: None)
        try:
            recipe = session.merge_recipe(torch.tensor([0.31, 0.77], dtype=torch.float64))
            tokenizer = session.backend.tokenizer
            score = session.score(MergeCandidate(recipe), session.validation)
        finally:
            session.close()
    assert recipe["merge_method"] == "df_merge" and np.isfinite(score.scores).all()
    entries = recipe["models"]
    assert [e["parameters"]["weight"] for e in entries] == [0.31, 0.77]
    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).state_dict()
    for entry, grid_lam, spec in zip(entries, (0.30, 0.75), (objectives[1], objectives[0]), strict=True):
        expert = AutoModelForCausalLM.from_pretrained(models[entry["model"]], dtype=torch.float32)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                p.copy_(base[name] + grid_lam * (p - base[name]))
        objective = get_objective(spec)
        expected = diagonal_fisher(expert, tokenizer, list(objective.examples("validation"))[:5], objective.decoding)
        got = load_fisher(entry["parameters"]["fisher"])
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-10, msg=name)


def test_fisher_files_are_read_once_per_session_and_again_only_when_they_change(tiny_family, tmp_path, monkeypatch):
    """Candidates whose weights fall on the same point of the Fisher coefficient grid name the same Fisher
    files: they are read and set on the merger for the first, not again for the next (a 1.5B model's are
    gigabytes); a rewritten file is read again, and the merge then uses it."""
    import shutil

    from hm3 import fisher as fisher_module
    from hm3.fisher import load_fisher, save_fisher

    _, _, objectives = tiny_family
    data = _config(tiny_family)
    data["search_space"] |= {"fisher": True}
    data |= {"experts": {"m1": objectives[1], "m2": objectives[0]}, "fisher": {"examples": 3}}
    cfg = parse_run_config(data)
    reads: list[str] = []
    real = fisher_module.load_fisher
    monkeypatch.setattr(fisher_module, "load_fisher", lambda path: reads.append(str(path)) or real(path))
    with RunStore.open(tmp_path / "r") as store:
        session = LiveModelSession(cfg, store, log=lambda m: None)
        try:
            first = session.merge_recipe(torch.tensor([0.3, 0.7, 0.5, 0.5], dtype=torch.float64))
            second = session.merge_recipe(torch.tensor([0.3, 0.7, 0.9, 0.2], dtype=torch.float64))
            files = [e["parameters"]["fisher"] for e in first["models"]]
            assert files == [e["parameters"]["fisher"] for e in second["models"]] and all(files)
            session.score(MergeCandidate(first), session.validation)
            assert sorted(reads) == sorted(files)
            session.score(MergeCandidate(second), session.validation)
            assert sorted(reads) == sorted(files)  # not read again

            # m1's Fisher rewritten as m2's (another file content): read again, and merged with
            shutil.copy(files[1], tmp_path / "other.safetensors")
            save_fisher(files[0], load_fisher(tmp_path / "other.safetensors"))
            third = session.merge_recipe(torch.tensor([0.3, 0.7, 0.2, 0.9], dtype=torch.float64))
            session.score(MergeCandidate(third), session.validation)
            assert len(reads) == 2 * len(files)
            held = session.merger._fishers["m1"]
            assert all(torch.equal(held[n], t) for n, t in load_fisher(files[1]).items() if n in held)
        finally:
            session.close()
