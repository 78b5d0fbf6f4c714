"""``hm3 front RUN --html``: one self-contained interactive page of a finished run's front.

The page holds every evaluated candidate (one panel per pair of objectives), the front highlighted
and labelled with ids, hover text with each point's id, level, validation and test scores and its
recipe or layer path, the reference models, level 1's hypervolume after each evaluation, and a
preference control: one slider per objective, and the point a budget-0 ``hm3 request`` returns for
that preference marked with a star. Those answers come from :mod:`hm3.preference_answers` (the
request's own code, run here for every slider setting); the page's script only looks them up.

Self-contained: plotly.js is inlined (no CDN, no network), so the file can be mailed or opened from
a shared disk; it is ~5 MB for that reason.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hm3.atomic import atomic_write_text
from hm3.front_view import EvaluatedPoint, RunView, describe, read_run_view
from hm3.preference_answers import PreferenceAnswer, budget_zero_answers, preference_names, slider_steps
from hm3.report import PROJECTION_NOTE

PAGE_FILE = "front.html"
COLOURS = {"front": "#d62728", "evaluated": "#9a9a9a", "answer": "#f2b705"}
SYMBOLS = {"merge": "circle", "path": "diamond"}
#: Reference models: colours apart from the front's red, the candidates' grey and the answer's gold.
REFERENCE_COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#393b79"]
REFERENCE_SYMBOLS = ["square", "triangle-up", "cross", "triangle-down", "x", "pentagon", "hexagon", "star-square"]
PANEL_COLUMNS = 3
BASIS = {"measured": "stored, measured on the whole validation plan",
         "estimated": "estimated from every validation score the run stored for this path",
         "predicted": "predicted by the level-1 BO posterior; never evaluated"}


def write_front_page(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page for the finished run in ``run_dir`` to ``out`` (default ``RUN_DIR/front.html``)."""
    if out is not None:
        _check_not_a_run_file(Path(run_dir), Path(out))
    view, run = read_run_view(run_dir)
    steps = slider_steps(len(view.objectives))
    answers = budget_zero_answers(Path(run_dir), run, steps)
    page = front_page(view, answers, steps)
    # UTF-8 as the page declares, whatever the locale's encoding (plotly.js and the page hold non-ASCII text)
    return atomic_write_text(Path(out) if out is not None else Path(run_dir) / PAGE_FILE, page, encoding="utf-8")



def _check_not_a_run_file(run_dir: Path, out: Path) -> None:
    """Refuse a page path that is one of the run's own files (its store, tables, summary): the page would
    replace what the run holds. Its own page, ``RUN_DIR/front.html``, may be rewritten."""
    from hm3.errors import OutputExistsError

    target, run = out.resolve(), run_dir.resolve()
    if target.exists() and run in target.parents and target != run / PAGE_FILE:
        raise OutputExistsError(f"--html {out}: a file of the run {run_dir}; the page would replace it: "
                                f"choose another file (default {run_dir / PAGE_FILE})")


def front_page(view: RunView, answers: list[PreferenceAnswer], steps: int) -> str:
    """The page's HTML (see the module docstring); ``answers`` for every direction of sliders ``0..steps``."""
    from plotly.offline import get_plotlyjs

    figure, answer_traces = front_figure(view)
    names = preference_names(view.objectives)
    data = {
        "objectives": view.objectives,
        "names": names,
        "steps": steps,
        "pairs": panel_pairs(len(view.objectives)),
        "front": json.loads(figure.to_json()),
        "answerTraces": answer_traces,
        "hv": json.loads(hv_figure(view.hv_trace).to_json()) if view.hv_trace else None,
        "answers": {",".join(map(str, a.weights)): _answer_data(view, a) for a in answers},
    }
    front_size = sum(p.on_front for p in view.points)
    caption = "Validation scores, higher is better. " + (PROJECTION_NOTE + " " if len(view.objectives) > 2 else "")
    return PAGE_TEMPLATE.format(
        title=html.escape(f"hm3 front: {view.run_dir}"),
        heading=html.escape(f"Front of {view.run_dir}"),
        summary=html.escape(
            f"{view.command}: {len(view.points)} candidates evaluated on the whole validation plan, front of "
            f"{front_size} (red, labelled by id; test scores measured for front points only). Hypervolume: "
            f"validation {view.hv_validation:.4f}, test (front) {view.hv_test_front:.4f} ({view.hv_protocol})."),
        caption=html.escape(caption + "Hover a point for its id, level, scores and recipe or layer path."),
        sliders="\n".join(
            f'<label class="weight"><span class="name">{html.escape(n)}</span>'
            f'<input type="range" id="w-{i}" min="0" max="{steps}" step="1" value="1">'
            f'<span class="value" id="w-{i}-value"></span></label>'
            for i, n in enumerate(names)),
        hv_note="" if view.hv_trace else "<p>No level-1 hypervolume trace: level 1 was skipped in this run.</p>",
        plotlyjs=get_plotlyjs(),
        data=_script_json(data),
        script=PAGE_SCRIPT,
    )


def panel_pairs(k: int) -> list[list[int]]:
    """The objective pairs drawn, one panel each (a single objective: one panel of it against itself)."""
    return [list(p) for p in itertools.combinations(range(k), 2)] or [[0, 0]]


def front_figure(view: RunView):
    """The plotly figure of the candidates, and the indices of its budget-0-answer traces (one per panel)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = panel_pairs(len(view.objectives))
    cols = min(PANEL_COLUMNS, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.08, vertical_spacing=0.12)
    groups = {
        ("evaluated", kind): [p for p in view.points if not p.on_front and p.kind == kind] for kind in SYMBOLS
    } | {("front", kind): [p for p in view.points if p.on_front and p.kind == kind] for kind in SYMBOLS}
    answer_traces = []
    for n, (i, j) in enumerate(pairs):
        row, col = divmod(n, cols)
        where = {"row": row + 1, "col": col + 1}
        fig.add_trace(go.Scatter(
            x=[], y=[], mode="markers", name="budget-0 request's answer", legendgroup="answer", showlegend=n == 0,
            marker={"symbol": "star", "size": 28, "color": COLOURS["answer"], "line": {"width": 1.5, "color": "#000"}},
            hoverinfo="text"), **where)
        answer_traces.append(len(fig.data) - 1)
        for (role, kind), points in groups.items():
            if not points:
                continue
            fig.add_trace(go.Scatter(
                x=[p.validation[i] for p in points], y=[p.validation[j] for p in points],
                mode="markers+text" if role == "front" else "markers",
                text=[str(p.id) for p in points] if role == "front" else None, textposition="top center",
                textfont={"size": 10, "color": COLOURS[role]},
                marker={"color": COLOURS[role], "symbol": SYMBOLS[kind], "size": 10 if role == "front" else 7,
                        "line": {"width": 0.5, "color": "#333"}},
                name=f"{'front' if role == 'front' else 'evaluated'}: {'merges' if kind == 'merge' else 'layer paths'}",
                legendgroup=f"{role}-{kind}", showlegend=n == 0,
                hovertext=[hover_text(view, p) for p in points], hoverinfo="text",
            ), **where)
        for r, (name, scores) in enumerate(view.references.items()):
            fig.add_trace(go.Scatter(
                x=[scores[i]], y=[scores[j]], mode="markers", name=plotly_text(f"reference: {name}"), legendgroup=f"ref-{name}",
                showlegend=n == 0, marker={"symbol": REFERENCE_SYMBOLS[r % len(REFERENCE_SYMBOLS)], "size": 11,
                                           "color": REFERENCE_COLOURS[r % len(REFERENCE_COLOURS)], "line": {"width": 1}},
                hovertext=plotly_text(f"reference model {name}: {_scores(view.objectives, scores)}"),
                hoverinfo="text"), **where)
        fig.update_xaxes(title_text=plotly_text(view.axis_labels[i]), **where)  # plotly reads titles as HTML
        fig.update_yaxes(title_text=plotly_text(view.axis_labels[j]), **where)
    fig.update_layout(height=430 * rows, margin={"t": 30, "b": 50, "l": 60, "r": 20}, template="plotly_white",
                      legend={"orientation": "h", "y": -0.12 if rows == 1 else -0.06}, hovermode="closest")
    return fig, answer_traces


def hv_figure(trace: list[float]):
    """Level 1's hypervolume (validation, protocol scale) after each evaluation."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=list(range(1, len(trace) + 1)), y=trace, mode="lines+markers", name="HV",
                               hovertemplate="after %{x} evaluations: HV %{y:.4f}<extra></extra>"))
    fig.update_layout(height=320, template="plotly_white", margin={"t": 40, "b": 50, "l": 60, "r": 20},
                      title="Level 1: hypervolume (validation) after each evaluation",
                      xaxis_title="evaluations", yaxis_title="hypervolume")
    return fig


def hover_text(view: RunView, point: EvaluatedPoint) -> str:
    """A point's hover text: plotly reads it as HTML, so everything from the run is escaped."""
    head = f"<b>#{point.id}</b> " + plotly_text(f"level {point.level} {point.kind}{' (front)' if point.on_front else ''}")
    test = _scores(view.objectives, point.test) if point.test is not None else "not measured (front points only)"
    lines = [f"validation: {_scores(view.objectives, point.validation)}", f"test: {test}",
             *describe(point.recipe).splitlines()]
    return "<br>".join([head, *(plotly_text(line) for line in lines)])


def plotly_text(text: str) -> str:
    """``text`` as plotly shows it: plotly reads its labels as HTML (tags make bold text, links) and
    decodes only a few entities (``&lt;``, ``&gt;``, ``&amp;``, not ``&quot;``), so only those are escaped."""
    return html.escape(text, quote=False)


def _scores(objectives: list[str], values) -> str:
    return ", ".join(f"{n} {v:.3f}" for n, v in zip(preference_names(objectives), values, strict=True))


def _answer_data(view: RunView, answer: PreferenceAnswer) -> dict[str, Any]:
    """What the page shows for one slider direction."""
    data = asdict(answer)
    return {k: data[k] for k in ("prefer", "lam", "source", "kind", "candidate", "scores", "score")} | {
        "basis": BASIS[answer.basis], "recipe": describe(answer.recipe),
        # shell-quoted here: a run directory with a space (or the page's own characters) must paste as one argument
        "command": shlex.join(["hm3", "request", str(view.run_dir), "--prefer", answer.prefer, "OUT_DIR"]),
        "hover": "<b>budget-0 answer</b><br>" + plotly_text(f"{answer.source}: {_scores(view.objectives, answer.scores)}")}


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element: no ``<`` at all (``\\u003c`` is the same JSON string), so
    neither ``</script>`` nor ``<!--<script>`` (after which the next ``</script>`` does not end the
    element, and the page's own script never runs) can come from a run's strings."""
    return json.dumps(data, allow_nan=False).replace("<", "\\u003c")


PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.2em 2em; color: #222; }}
.caption {{ color: #555; max-width: 70em; }}
#preference {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; max-width: 70em; }}
label.weight {{ display: inline-flex; align-items: center; gap: 0.4em; margin-right: 1.6em; }}
label.weight .value {{ font-variant-numeric: tabular-nums; min-width: 4.5em; color: #555; }}
#answer {{ display: block; margin-top: 0.6em; font-weight: 600; }}
#answer-recipe {{ background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; }}
</style>
<script type="text/javascript">{plotlyjs}</script>
</head>
<body>
<h1>{heading}</h1>
<p>{summary}</p>
<p class="caption">{caption}</p>
<section id="preference">
<h2>What a budget-0 request returns</h2>
<p class="caption">One weight per objective; they are normalised to sum to 1, as <code>hm3 request --prefer</code>
does. The star marks the answer <code>hm3 request</code> gives at <code>--budget 0</code>, computed by the
request's own code when this page was written.</p>
{sliders}
<output id="answer"></output>
<div id="answer-detail"></div>
<pre id="answer-recipe"></pre>
<code id="answer-command"></code>
</section>
<div id="front-plot"></div>
<div id="hv-plot"></div>
{hv_note}
<script type="application/json" id="hm3-data">{data}</script>
<script type="text/javascript">{script}</script>
</body>
</html>
"""

PAGE_SCRIPT = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("hm3-data").textContent);
  const k = DATA.names.length;
  const sliders = DATA.names.map((_, i) => document.getElementById("w-" + i));
  const gcd = (a, b) => (b === 0 ? a : gcd(b, a % b));

  function weightsFromHash() {
    const m = /(?:^#|&)w=([0-9,]+)/.exec(window.location.hash);
    if (!m) return null;
    const w = m[1].split(",").map(Number);
    return w.length === k && w.every((v) => Number.isInteger(v) && v >= 0 && v <= DATA.steps) ? w : null;
  }

  function answerFor(w) {
    const g = w.reduce(gcd, 0);
    return g === 0 ? null : DATA.answers[w.map((v) => v / g).join(",")];
  }

  function show(w) {
    const total = w.reduce((a, b) => a + b, 0);
    w.forEach((v, i) => {
      document.getElementById("w-" + i + "-value").textContent = total ? "λ " + (v / total).toFixed(3) : "λ –";
    });
    const out = document.getElementById("answer");
    const a = answerFor(w);
    if (!a) {
      out.textContent = "Give at least one objective a positive weight.";
      delete out.dataset.source;
      ["answer-detail", "answer-recipe", "answer-command"].forEach((id) => {
        document.getElementById(id).textContent = "";
      });
      Plotly.restyle("front-plot", { x: DATA.pairs.map(() => []), y: DATA.pairs.map(() => []) }, DATA.answerTraces);
      return;
    }
    out.textContent = "answer: " + a.source + " (" + a.kind + ")";
    out.dataset.source = a.source;
    out.dataset.prefer = a.prefer;
    out.dataset.candidate = a.candidate === null ? "" : String(a.candidate);
    const scores = a.scores.map((v, i) => DATA.names[i] + "=" + v.toFixed(3)).join(", ");
    document.getElementById("answer-detail").textContent =
      "validation scores " + scores + " (" + a.basis + "); chosen by Σ λ·f̂ = " + a.score.toFixed(4);
    document.getElementById("answer-recipe").textContent = a.recipe;
    document.getElementById("answer-command").textContent = a.command;
    Plotly.restyle("front-plot", {
      x: DATA.pairs.map((p) => [a.scores[p[0]]]),
      y: DATA.pairs.map((p) => [a.scores[p[1]]]),
      hovertext: DATA.pairs.map(() => [a.hover]),
    }, DATA.answerTraces);
  }

  function current() {
    return sliders.map((s) => Number(s.value));
  }

  const config = { responsive: true, displaylogo: false };
  const drawn = [Plotly.newPlot("front-plot", DATA.front.data, DATA.front.layout, config)];
  if (DATA.hv) drawn.push(Plotly.newPlot("hv-plot", DATA.hv.data, DATA.hv.layout, config));
  Promise.all(drawn).then(() => {
    const start = weightsFromHash();
    if (start) start.forEach((v, i) => { sliders[i].value = String(v); });
    show(current());
    sliders.forEach((s) => s.addEventListener("input", () => {
      const w = current();
      show(w);
      try { history.replaceState(null, "", "#w=" + w.join(",")); } catch (e) { /* some file:// pages refuse */ }
    }));
    document.body.dataset.ready = "true";
  });
})();
"""
