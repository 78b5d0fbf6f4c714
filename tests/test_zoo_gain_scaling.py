"""experiments/zoo_gain_scaling.py: a lone expert scaled down, scored as the zoo's bar scores its merges."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import zoo_gain_scaling  # noqa: E402

from hm3.eval.hf import HFBackend  # noqa: E402
from hm3.zoo.build import ZooManifest, score_models  # noqa: E402
from objectives.zoo import ZOO_TASKS  # noqa: E402

EXAMPLES = 40  # of the 200 the bar uses: enough for gains, quick to score


@pytest.fixture(scope="module")
def rescored_zoo(micro_zoo_dir, tmp_path_factory):
    """A copy of the shipped zoo judged on its first EXAMPLES validation examples, its manifest's scores the
    ones this machine gives (another CPU's kernels may flip an answer, and the script refuses any drift)."""
    from safetensors.torch import load_file

    zoo = tmp_path_factory.mktemp("gain") / "micro"
    shutil.copytree(micro_zoo_dir, zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    manifest["spec"]["eval_examples"] = EXAMPLES
    states = {m: load_file(str(zoo / f / "model.safetensors")) for m, f in manifest["models"].items()}
    backend = HFBackend.from_pretrained(zoo / manifest["models"]["base"], batch_size=EXAMPLES)
    try:
        manifest["scores_validation"] = score_models(backend, states, "validation", EXAMPLES)
    finally:
        backend.close()
    (zoo / "zoo.json").write_text(json.dumps(manifest))
    return zoo


def test_scale_zero_keeps_nothing_and_the_scores_follow_the_scale(rescored_zoo):
    """θ_base + 0·τ is the base, bit for bit: no gain kept. Each scale is scored apart: the shares differ."""
    manifest = ZooManifest.read(rescored_zoo)
    kept = zoo_gain_scaling.lone_expert_kept(rescored_zoo, manifest, [0.0, 0.7])
    assert set(kept) == set(ZOO_TASKS)
    for task in ZOO_TASKS:
        assert kept[task]["0.0"] == 0.0
    assert any(kept[t]["0.7"] > 0.2 for t in ZOO_TASKS)  # the shipped experts' margins are 0.2 or more


def test_a_manifest_whose_scores_this_machine_does_not_give_is_refused(rescored_zoo, tmp_path):
    zoo = tmp_path / "micro"
    shutil.copytree(rescored_zoo, zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    manifest["scores_validation"]["code"]["math"] += 0.05
    (zoo / "zoo.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="differ from its zoo.json by up to 0.0500"):
        zoo_gain_scaling.lone_expert_kept(zoo, ZooManifest.read(zoo), [0.5])


def test_a_row_sets_the_lone_expert_at_the_merges_own_weight_beside_the_merge(rescored_zoo, tmp_path):
    out = tmp_path / "gain.json"
    assert zoo_gain_scaling.main([str(rescored_zoo), "--scales", "0.7", "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    manifest = ZooManifest.read(rescored_zoo)
    assert found["scales"] == [0.25, 0.4, 0.55, 0.7]  # the bar's weights are always among them
    (row,) = found["rows"]
    weights = dict(zip(ZOO_TASKS, manifest.ties_best["weights"], strict=True))
    assert row["merge_weights"] == weights
    for t in ZOO_TASKS:
        assert row["lone_kept_at_merge_weight"][t] == row["lone_kept"][t][f"{weights[t]}"]
        assert row["merge_kept"][t] == manifest.quality_bar["checks"][t]["ties_gain_kept"]
