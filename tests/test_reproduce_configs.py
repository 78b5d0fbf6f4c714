"""Every reproduction config under experiments/reproduce/ goes through ``hm3 check``: it passes, or it
fails with exactly the limitation its README documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hm3.cli import main

REPRODUCE = Path(__file__).parents[1] / "experiments" / "reproduce"
#: config -> None (passes) or the text its failure must hold (documented in the folder's README)
EXPECTED = {
    "hm3_qwen25_1p5b/config.yml": None,
    "hm3_llama2_7b/config.yml": None,
    "evolutionary_merge_mgsm_ja/ps.yml": None,
    "evolutionary_merge_mgsm_ja/ps_dfs.yml": None,
}


def test_every_config_and_folder_is_accounted_for() -> None:
    configs = {str(p.relative_to(REPRODUCE)) for p in REPRODUCE.glob("*/*.yml")}
    assert configs == set(EXPECTED)
    for folder in (p for p in REPRODUCE.iterdir() if p.is_dir()):
        assert (folder / "README.md").is_file(), folder
    assert not list((REPRODUCE / "df_merge_t5_base").glob("*.yml"))  # no config pretending to work


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(EXPECTED))
def test_reproduction_config_checks(config: str, capsys: pytest.CaptureFixture) -> None:
    rc = main(["check", str(REPRODUCE / config), "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    expected = EXPECTED[config]
    if expected is None:
        assert rc == 0 and out["passed"], out["error"]
    else:
        assert rc == 3 and expected in out["error"]
