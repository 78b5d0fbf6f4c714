"""Asynchronous proposals: optimisers asked for a point while others are pending, told in any order."""

from __future__ import annotations

import pytest
import torch

from hm3.errors import ConfigError
from hm3.search.optimizers import get_optimizer
from hm3.search.optimizers.random import sobol_points
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore

D = 3


def _scores(X: torch.Tensor) -> torch.Tensor:
    centres = torch.tensor([[0.2, 0.2, 0.2], [0.8, 0.8, 0.5]], dtype=torch.float64)
    return 1 - ((X[:, None, :] - centres[None]) ** 2).sum(-1)


def test_sobol_hands_out_the_next_points_of_its_sequence_while_others_are_pending():
    opt = get_optimizer("random")(D, 2, seed=3, budget=4)
    a, b = opt.ask_async(1), opt.ask_async(1)
    expected = sobol_points(D, seed=3, start=0, n=4)
    assert torch.equal(torch.cat([a, b]), expected[:2]) and opt.remaining == 2
    opt.tell(b, _scores(b))  # out of order
    assert len(opt.X_pending) == 1 and torch.equal(opt.X_pending, a)
    c = opt.ask_async(1)
    assert torch.equal(c, expected[2:3])
    opt.tell(a, _scores(a))
    opt.tell(c, _scores(c))
    d = opt.ask_async(2)
    assert torch.equal(d, expected[3:4])  # the budget's last point, though two were asked for
    assert len(opt.ask_async(1)) == 0 and opt.remaining == 0


def test_bo_waits_for_a_first_score_then_conditions_its_point_on_the_pending_ones():
    options = {"n_init": 2, "num_restarts": 2, "raw_samples": 32, "mc_samples": 32}
    opt = get_optimizer("bo-mo")(D, 2, seed=1, budget=8, **options)
    design = torch.cat([opt.ask_async(1), opt.ask_async(1)])
    assert torch.equal(design, sobol_points(D, seed=1, start=0, n=2))
    assert len(opt.ask_async(1)) == 0  # the design is handed out and no score is back: nothing to model
    opt.tell(design[1:], _scores(design[1:]))
    opt.tell(design[:1], _scores(design[:1]))
    extra = sobol_points(D, seed=9, start=0, n=1)
    opt.tell(extra, _scores(extra))  # three points told, none pending

    twin = get_optimizer("bo-mo")(D, 2, seed=1, budget=8, **options)
    twin.tell(opt.X, opt.Y)
    first = opt.ask_async(1)  # no point pending: what a batch ask of one proposes
    assert torch.equal(first, twin.ask(1))
    second = opt.ask_async(1)  # `first` pending: the acquisition discounts it
    assert len(opt.X_pending) == 2 and not torch.allclose(second, first, atol=1e-3)


@pytest.mark.parametrize("name", ["nsga2", "hm3-fixed"])
def test_optimizers_that_need_their_order_refuse_async_proposals(tiny_family, name):
    from hm3.search.level1 import make_optimizer

    _, models, objectives = tiny_family
    options = {"pop_size": 4} if name == "nsga2" else {}
    cfg = parse_run_config({
        "models": models, "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "optimizer": {"name": name, "budget": 4, "options": options},
        "evaluation": {"executor": "ray", "workers": 2, "proposals": "async"},
    })
    with pytest.raises(ConfigError, match=rf"proposals: async: optimizer '{name}' proposes in batches only.*"
                                          r"bo-mo, bo-tcheby, df-merge, random"):
        make_optimizer(cfg)
    with pytest.raises(RuntimeError, match="proposes in batches only"):
        make_optimizer(parse_run_config(cfg.model_dump() | {"evaluation": {}})).ask_async(1)


def test_async_proposals_are_a_setting_of_the_ray_executor(tiny_family):
    _, models, objectives = tiny_family
    with pytest.raises(ConfigError, match="proposals is a setting of executor: ray"):
        parse_run_config({"models": models, "objectives": objectives,
                          "search_space": {"base_model": "base", "models": ["m1", "m2"]},
                          "evaluation": {"proposals": "async"}})


def test_in_flight_asks_are_the_points_asked_and_never_told(tmp_path):
    from hm3.search.level1 import ASK_EVENT, TELL_EVENT, in_flight_asks

    with RunStore.open(tmp_path / "run") as store:
        for cid, x in [(1, [0.1]), (2, [0.2]), (1, [0.1]), (3, [0.3])]:  # candidate 1 proposed twice
            store.add_event(ASK_EVENT, {"candidate": cid, "x": x})
        for cid, x in [(2, [0.2]), (1, [0.1])]:
            store.add_event(TELL_EVENT, {"candidate": cid, "x": x})
        assert in_flight_asks(store) == [(1, [0.1]), (3, [0.3])]
