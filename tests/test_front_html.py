"""Front plots: the static PNG's labels, caption and hypervolume panel, and ``hm3 front RUN --html``
(the interactive page) on both kinds of run, checked against ``hm3 request`` and in headless chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hm3.cli import main
from hm3.errors import ExitCode
from hm3.front_view import EvaluatedPoint, RunView
from hm3.preference_answers import PreferenceAnswer
from hm3.report import PROJECTION_NOTE, front_figure
from hm3.report_html import BASIS, front_page
from hm3.request import answer_request
from hm3.run.config import parse_two_level_config
from hm3.run.two_level import run_two_level
from hm3.search.level1 import run_level1, told_points
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore
from tests.headless_chromium import BINARY, HeadlessChromium

RL = {"offline_episodes": 8, "online_episodes": 4, "episodes_per_update": 4, "epochs": 2, "data_scale": 0.5,
      "t_max": 4}
FRONT_RED = (214, 39, 40)  # report_html.COLOURS["front"]
ANSWER_GOLD = (242, 183, 5)  # report_html.COLOURS["answer"]


def _config(**extra) -> dict:
    """A small search on the shipped micro zoo: experts with distinct skills give a front whose points differ."""
    return {
        "zoo": "builtin:micro",
        "search_space": {"dare": True, "weight_bounds": [0.0, 1.0], "density_bounds": [0.2, 1.0]},
        "optimizer": {"name": "random", "budget": 6},
        "evaluation": {"validation_examples": 12, "test_examples": 12},
        "seed": 0,
    } | extra


@pytest.fixture(scope="module")
def runs(micro_zoo_dir, tmp_path_factory) -> dict[str, Path]:
    """A finished two-level run and a finished level-1 search on the micro zoo."""
    root = tmp_path_factory.mktemp("front_html")
    run_two_level(parse_two_level_config(_config(level2={"preferences": 2, "rl": RL})), root / "two-level",
                  progress=False)
    run_level1(parse_run_config(_config()), root / "level1", progress=False)
    return {"two-level": root / "two-level", "level1": root / "level1"}


@pytest.fixture(scope="module")
def pages(runs, tmp_path_factory) -> dict[str, Path]:
    """Each run's page, written by the CLI (``--html FILE`` for one, the default RUN_DIR/front.html for the other)."""
    out = tmp_path_factory.mktemp("pages") / "two-level.html"
    assert main(["front", str(runs["two-level"]), "--html", str(out)]) == 0
    assert main(["front", str(runs["level1"]), "--html"]) == 0
    return {"two-level": out, "level1": runs["level1"] / "front.html"}


def page_data(page: Path) -> dict:
    text = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="hm3-data">(.*?)</script>', text, re.S)[1])


def _front_ids(run: Path) -> set[int]:
    with (run / "front.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {int(r.get("point") or r["candidate"]) for r in rows}


def _evaluated_ids(run: Path) -> set[int]:
    if (run / "candidates.csv").is_file():
        with (run / "candidates.csv").open() as f:
            return {int(r["point"]) for r in csv.DictReader(f)}
    with RunStore.open(run, readonly=True) as store:
        return {cid for cid, _ in told_points(store)}


def test_static_front_plot_labels_the_front_captions_projections_and_draws_the_hv_trace():
    rng = np.random.default_rng(0)
    names = ["math", "code", "translation"]
    candidates, front = rng.random((12, 3)), rng.random((3, 3))
    refs = {"base": np.zeros(3)}
    fig = front_figure(names, candidates, front, refs, front_ids=[7, 11, 30], hv_trace=[0.1, 0.2, 0.25])
    panels, hv = fig.axes[:3], fig.axes[3]
    for ax in panels:  # every pair panel labels each front point with its id, at the point
        labels = {t.get_text(): t.xy for t in ax.texts}
        assert set(labels) == {"7", "11", "30"}
    i, j = 0, 2  # the second panel: math vs translation
    assert fig.axes[1].texts[1].xy == (front[1, i], front[1, j])
    assert [t.get_text() for t in fig.texts] == [PROJECTION_NOTE]
    assert list(hv.lines[0].get_ydata()) == [0.1, 0.2, 0.25] and list(hv.lines[0].get_xdata()) == [1, 2, 3]
    two = front_figure(names[:2], candidates[:, :2], front[:, :2], {}, front_ids=[7, 11, 30])
    assert len(two.axes) == 1 and not two.texts  # one panel, no trace: no projection caption, no HV panel


@pytest.mark.parametrize("kind", ["two-level", "level1"])
def test_the_page_is_self_contained_and_holds_every_candidate_the_front_and_hover_details(runs, pages, kind):
    run, page = runs[kind], pages[kind]
    text = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|<iframe\b", text)  # nothing loaded from elsewhere
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js itself is inline
    data = page_data(page)
    panel = [t for t in data["front"]["data"] if t.get("xaxis", "x") == "x"]  # the first panel's traces
    ids = {role: {int(re.match(r"<b>#(\d+)</b>", h)[1]) for t in panel if t["legendgroup"].startswith(role)
                  for h in t["hovertext"]} for role in ("front-", "evaluated-")}
    assert ids["front-"] == _front_ids(run)
    assert ids["front-"] | ids["evaluated-"] == _evaluated_ids(run) and not ids["front-"] & ids["evaluated-"]
    hovers = {int(re.match(r"<b>#(\d+)</b>", h)[1]): h for t in panel if t["legendgroup"][:5] in ("front", "evalu")
              for h in t["hovertext"]}
    with (run / "front.csv").open() as f:
        row = next(csv.DictReader(f))
    cid = int(row.get("point") or row["candidate"])
    names = data["names"]
    assert f"validation: {names[0]} {float(row[data['objectives'][0] + '_val']):.3f}" in hovers[cid]
    assert f"test: {names[0]} {float(row[data['objectives'][0] + '_test']):.3f}" in hovers[cid]
    assert "(front)" in hovers[cid] and "dare_ties over base" in hovers[cid] and "weight" in hovers[cid]
    for other in ids["evaluated-"]:
        assert "test: not measured" in hovers[other]
    if kind == "two-level":
        assert any("layer path, frame = " in h for h in hovers.values())
        assert data["hv"] is not None and (run / "level1" / "summary.json").is_file()
    trace = json.loads(((run / "level1") if kind == "two-level" else run).joinpath("summary.json").read_text())
    assert data["hv"]["data"][0]["y"] == trace["hv_trace_validation"]


@pytest.mark.parametrize("kind", ["two-level", "level1"])
def test_the_page_marks_what_a_budget_0_request_returns(runs, pages, tmp_path, kind):
    """The page's answer for a slider setting is the one ``hm3 request --budget 0`` gives for it."""
    data = page_data(pages[kind])
    steps = data["steps"]
    assert data["names"] == ["math", "code", "translation"] and steps == 6  # every slider direction answered:
    grid = np.stack(np.meshgrid(*[np.arange(steps + 1)] * 3), -1).reshape(-1, 3)
    assert sorted(data["answers"]) == sorted(",".join(map(str, w)) for w in grid if np.gcd.reduce(w) == 1)
    sources = set()
    for key in ("1,0,0", "0,1,0", "0,0,1", "1,1,1", "3,1,0", "1,4,2"):
        page = data["answers"][key]
        ans = answer_request(runs[kind], page["prefer"], tmp_path / key.replace(",", "-"), progress=False)
        assert page["source"] == ans.source and page["kind"] == ans.kind
        assert page["scores"] == [float(v) for v in ans.scores] and page["basis"] == BASIS[ans.scores_are]
        assert page["score"] == ans.details["weighted_normalised_score"]
        sources.add(ans.source)
    assert len(sources) >= 2  # the settings tried do move the answer


READY = "document.body !== null && document.body.dataset.ready === 'true'"


def set_sliders(browser: HeadlessChromium, weights: list[int]) -> str | None:
    """Move the page's sliders as a user would (an input event each) and read the answer it shows."""
    return browser.evaluate(f"""(() => {{
        {json.dumps(weights)}.forEach((v, i) => {{
            const slider = document.getElementById("w-" + i);
            slider.value = String(v);
            slider.dispatchEvent(new Event("input"));
        }});
        return document.getElementById("answer").dataset.source;
    }})()""")


def colour_pixels(png: Path, rgb: tuple[int, int, int], tolerance: int = 24) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=2) <= tolerance).sum())


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(BINARY is None, reason="needs a real headless browser: chromium is not installed "
                                           "(Debian: apt-get install -y chromium)")
@pytest.mark.parametrize("kind", ["two-level", "level1"])
def test_the_page_in_headless_chromium(runs, pages, tmp_path, kind):
    """The page loads without a console message or a request beyond itself, draws the points, and
    shows for a preference set in the URL or on the sliders the answer of ``hm3 request --budget 0``."""
    page, names = pages[kind], page_data(pages[kind])["names"]

    def request(weights: list[int]) -> str:
        prefer = ",".join(f"{n}={w}" for n, w in zip(names, weights, strict=True))
        return answer_request(runs[kind], prefer, tmp_path / prefer.replace(",", "_"), progress=False).source

    with HeadlessChromium(tmp_path / "profile", timeout=900) as browser:
        browser.open(f"{page.as_uri()}#w=6,2,0", ready=READY)  # the direction 3,1,0, set by the URL
        assert browser.evaluate("document.getElementById('answer').dataset.source") == request([3, 1, 0])
        answered = colour_pixels(browser.screenshot(tmp_path / "page.png"), ANSWER_GOLD)
        red = colour_pixels(tmp_path / "page.png", FRONT_RED)
        for weights in ([2, 0, 0], [0, 1, 0], [0, 3, 3], [1, 1, 4]):
            assert set_sliders(browser, weights) == request(weights), weights
        assert set_sliders(browser, [0, 0, 0]) is None  # no preference: no answer, and no star
        unanswered = colour_pixels(browser.screenshot(tmp_path / "no-answer.png"), ANSWER_GOLD)
        browser.evaluate("1")  # every event the page caused so far has arrived
        assert browser.console() == []
        assert browser.requested_urls() == [page.as_uri()]  # self-contained: nothing fetched from elsewhere
    print(f"front-red pixels {red}; answer-gold pixels {answered}, {unanswered} without an answer")
    front_points = len(_front_ids(runs[kind]))
    assert red > 3 * front_points * 40  # each front point's marker and id label in each of the three panels
    assert answered - unanswered > 3 * 150  # the answer's star in each panel (the legend's star stays)


def test_the_page_is_never_written_over_a_file_of_the_run(runs, capsys):
    run = runs["level1"]
    for name in ("hm3.sqlite", "summary.json"):
        before = (run / name).read_bytes()
        assert main(["front", str(run), "--html", str(run / name)]) == ExitCode.BAD_INPUT
        assert f"{run / name}" in capsys.readouterr().err and (run / name).read_bytes() == before


def _hostile_page(tmp_path: Path) -> tuple[Path, list[str], str]:
    """A page of a run whose every string is markup: objective, reference and model names, the point
    kind, the answer's source and a run directory that holds ``<!--<script>`` (in a script element's
    text it makes the next ``</script>`` not end it, so the page's own script never runs)."""
    names = ['m<b>ath</b>', 'c<a href="http://example.com/">ode</a>']
    recipe = {"merge_method": "ties", "base_model": "b</script><script>window.pwned=1</script>",
              "models": [{"model": "x<img src=x onerror=window.pwned=2>", "parameters": {"weight": 0.5}}]}
    points = [EvaluatedPoint(id=i, level=1, kind="merge", validation=(0.1 * i, 1 - 0.1 * i),
                             test=(0.1 * i, 0.2) if i < 3 else None, on_front=i < 3, recipe=recipe) for i in range(5)]
    view = RunView(run_dir=tmp_path / "my run<!--<script>", command="hm3 run", objectives=names, points=points,
                   references={"base<i>x</i>": [0.0, 0.0]}, base=[0.0, 0.0], ideal=[1.0, 1.0], hv_validation=0.5,
                   hv_test_front=0.4, hv_trace=[0.1, 0.2], axis_labels=names, hv_protocol="reference point <b>0</b>")
    source = "front point 1<img src=x onerror=window.pwned=3>"
    answers = [PreferenceAnswer(weights=w, prefer="m=1,c=2", lam=[0.5, 0.5], source=source, kind="merge", candidate=1,
                                scores=[0.1, 0.9], score=0.5, recipe=recipe, basis="measured")
               for w in [(0, 1), (1, 0), (1, 1)]]
    page = tmp_path / "page.html"
    page.write_text(front_page(view, answers, 1))
    return page, names, source


@pytest.mark.e2e
@pytest.mark.skipif(BINARY is None, reason="needs a real headless browser: chromium is not installed "
                                           "(Debian: apt-get install -y chromium)")
def test_strings_from_the_run_are_shown_as_text_never_read_as_markup_or_script(tmp_path):
    page, names, source = _hostile_page(tmp_path)
    with HeadlessChromium(tmp_path / "profile", timeout=90) as browser:
        browser.open(page.as_uri(), ready=READY)  # the page's script ran to the end
        assert browser.evaluate("String(window.pwned)") == "undefined"
        assert browser.evaluate("document.querySelectorAll('a, img, b, i').length") == 0
        titles = browser.evaluate("Array.from(document.querySelectorAll('#front-plot .xtitle, #front-plot .ytitle'))"
                                  ".map((e) => e.textContent)")
        legend = browser.evaluate("Array.from(document.querySelectorAll('.legendtext')).map((e) => e.textContent)")
        assert browser.evaluate("document.getElementById('answer').textContent") == f"answer: {source} (merge)"
        assert browser.evaluate("document.querySelectorAll('#front-plot tspan[style]').length") == 0
        browser.evaluate("Plotly.Fx.hover('front-plot', [{curveNumber: 1, pointNumber: 0}])")  # an evaluated point
        hover = browser.evaluate("document.querySelector('#front-plot .hovertext').textContent")
        command = browser.evaluate("document.getElementById('answer-command').textContent")
    assert titles == names
    assert "reference: base<i>x</i>" in legend
    assert 'x<img src=x onerror=window.pwned=2>: weight 0.5' in hover and "b</script><script>" in hover
    run_dir = str(tmp_path / "my run<!--<script>")  # the command shown runs as shown, in a shell
    assert shlex.split(command) == ["hm3", "request", run_dir, "--prefer", "m=1,c=2", "OUT_DIR"]


def test_the_page_and_hm3_front_state_axis_directions_and_the_hv_protocol(runs, tmp_path, capsys):
    """An objective whose raw metric is better when lower is scored as its utility: the page's axes say
    so, as front.png's do; both ``hm3 front`` and the page state the hypervolume's normalisation and
    reference point."""
    run = tmp_path / "run"
    shutil.copytree(runs["level1"], run)
    summary = json.loads((run / "summary.json").read_text())
    names = summary["objectives"]
    summary["utility_maps"] = {n: "raw" for n in names} | {names[1]: "-raw"}
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["front", str(run), "--html"]) == 0
    layout = page_data(run / "front.html")["front"]["layout"]
    titles = [layout[a]["title"]["text"] for a in ("xaxis", "yaxis", "xaxis2", "yaxis2")]
    assert titles == [names[0], f"{names[1]} (-raw; raw: lower is better)", names[0], names[2]]
    text = (run / "front.html").read_text()
    assert "reference point = base model (0)" in text and "(f - base) / (ideal - base)" in text
    capsys.readouterr()
    assert main(["front", str(run)]) == 0
    out = capsys.readouterr().out
    assert "reference point = base model (0)" in out and "(f - base) / (ideal - base)" in out
    assert main(["--json", "front", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["hv_protocol"] == summary["hv_protocol"]


def test_the_page_is_written_as_the_utf_8_it_declares_whatever_the_locale(runs, tmp_path):
    """The page says ``charset=utf-8`` and holds non-ASCII text (λ, →): it is written as UTF-8 under a
    locale whose encoding is not (the C locale with Python's UTF-8 coercion off: ASCII)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k != "LANG"} | {
        "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    page = tmp_path / "page.html"
    proc = subprocess.run([sys.executable, "-m", "hm3.cli", "front", str(runs["two-level"]), "--html", str(page)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = page.read_bytes().decode("utf-8")
    assert '<meta charset="utf-8">' in text and "λ" in text and "layer path, frame = " in text


def test_names_with_dollars_or_a_leading_underscore_are_drawn_as_written():
    """matplotlib reads ``$…$`` as math and hides legend labels that start with ``_``: objective and model names
    are the user's, so each is drawn literally."""
    names = ["cost$", "$x$ rate"]
    fig = front_figure(names, np.random.default_rng(1).random((4, 2)), np.zeros((1, 2)), {"_base": np.zeros(2)},
                       title="run $1")
    fig.savefig(io.BytesIO(), format="png")  # renders every text (a bad escape would raise here)
    ax = fig.axes[0]
    assert [ax.get_xlabel(), ax.get_ylabel()] == [r"cost\$", r"\$x\$ rate"]  # escaped: shown as typed
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "\u200b_base" in legend  # shown, not dropped as a private label
