"""The batch report as one self-contained HTML file: what was asked, what it cost the model, whether it shipped.

Operators look rather than read, so the numbers of the markdown report come with three matplotlib figures
(accuracy before/after per set and modality, the path graph as a towers x layers heat map, wall time per step),
embedded as PNG data URIs: the file can be mailed, attached or opened from S3 with nothing beside it. Like the
markdown report it carries ids, counts and metrics, never the questions, answers or images being forgotten.
The page is a Jinja2 template (``templates/batch_report.html.j2``) with autoescaping on, so a request's reason or
an error message is shown as text and cannot add markup; this module computes the rows and the figures.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import jinja2

from mip_core.path_graph import PathGraph
from mip_core.service.batch import BatchManifest
from mip_core.service.report import request_state
from mip_core.types import TOWERS

_FLOORS = {"retain": "min_retention", "utility": "min_utility"}  # forgetting is judged per request (table above)
_CEILINGS = {"earlier": "max_relapse"}  # people forgotten earlier: a rise of at most this much
_SET_LABEL = {"forget": "forget (requested)", "test": "forget, held-out phrasings", "retain": "other people",
              "utility": "general knowledge", "earlier": "forgotten by earlier versions"}
_SHORT = {"test": "held-out", "earlier": "earlier"}  # x-axis labels must stay short


def support_matrix(graph: PathGraph) -> tuple[list[str], list[int], list[list[float]], list[list[int]]]:
    """``(towers, layers, support, neurons)`` per (tower, layer): the mean support of its kept neurons (how many
    forget items' paths share each of them: 1 = every item has its own neurons, high = one shared circuit) and
    how many neurons it keeps; NaN / 0 where a tower has no such layer or keeps nothing there. Towers in
    canonical order, layers 0..max over both towers."""
    towers = [t for t in TOWERS if any(n.tower == t for n in graph.nodes)]
    n_layers = 1 + max((n.layer for n in graph.nodes), default=-1)
    total = [[0.0] * n_layers for _ in towers]
    neurons = [[0] * n_layers for _ in towers]
    for node in graph.nodes:
        row = towers.index(node.tower)
        total[row][node.layer] += node.support
        neurons[row][node.layer] += 1
    support = [[t / n if n else math.nan for t, n in zip(trow, nrow, strict=True)]
               for trow, nrow in zip(total, neurons, strict=True)]
    return towers, list(range(n_layers)), support, neurons


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a worker
    import matplotlib.pyplot as plt

    return plt


def accuracy_figure(scores: Sequence[Mapping[str, Any]]) -> str:
    """Grouped bars: accuracy before and after the edit for every (set, modality); chance (1/4) dashed."""
    plt = _pyplot()
    labels = [f"{_SHORT.get(s['items'], s['items'])}\n{s['modality']}" for s in scores]
    x = range(len(scores))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(scores) + 1), 3.4))
    before = ax.bar([i - 0.2 for i in x], [s["before"] for s in scores], 0.4, label="before", color="#8c959f")
    after = ax.bar([i + 0.2 for i in x], [s["after"] for s in scores], 0.4, label="after", color="#0969da")
    ax.bar_label(before, fmt="%.2f", fontsize=7, padding=1)
    ax.bar_label(after, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(0.25, color="#cf222e", linestyle="--", linewidth=0.8, label="chance (4 options)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy (multiple choice or greedy answer)")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def path_heatmap_figure(graph: PathGraph) -> str:
    """Towers x layers heat map of the path graph's support, each cell labelled with its kept-neuron count."""
    plt = _pyplot()
    towers, layers, support, neurons = support_matrix(graph)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 2), 0.8 * len(towers) + 1.4))
    image = ax.imshow(support, aspect="auto", cmap="viridis")
    norm = image.norm
    for r, row in enumerate(neurons):
        for c, count in enumerate(row):
            if count:  # dark text on the light end of viridis, white on the dark end
                ax.text(c, r, str(count), ha="center", va="center", fontsize=7,
                        color="black" if norm(support[r][c]) > 0.6 else "white")
    ax.set_yticks(range(len(towers)), towers)
    ax.set_xticks(layers, [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("layer (cell label: neurons kept)")
    fig.colorbar(image, ax=ax, label="mean support per neuron", fraction=0.04, pad=0.02)
    return _png(fig)


def timings_figure(timings: Mapping[str, float]) -> str:
    """Horizontal bars: wall time per step, in seconds, in the order the steps ran."""
    plt = _pyplot()
    steps = list(timings)
    fig, ax = plt.subplots(figsize=(6.0, 0.35 * len(steps) + 1.0))
    bars = ax.barh(steps, [timings[s] for s in steps], color="#8250df")
    ax.bar_label(bars, fmt="%.1f s", fontsize=7, padding=2)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _cell(value: Any) -> str:
    """A table cell's text: floats to 3 decimals, NaN and None as '-' (the template escapes it)."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)


@functools.cache
def _template() -> jinja2.Template:
    """The page template (package data), autoescaped whatever its file name says: every value is text."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("mip_core.service", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["cell"] = _cell
    return env.get_template("batch_report.html.j2")


def batch_html(m: BatchManifest, records: Sequence[Any], *, gate: Mapping[str, Any] | None, version: str | None,
               error: str | None, timings: Mapping[str, float], shards: Sequence[Mapping[str, Any]] | None = None,
               graph: PathGraph | None = None, edit: Mapping[str, Any] | None = None,
               resources: Mapping[str, Any] | None = None, links: Mapping[str, str] | None = None) -> str:
    """The report page. ``edit`` is the edit job's summary (ranks, ZeRO stage, neurons); ``resources`` adds how the
    batch ran (launcher, actors asked for); ``links`` names the batch's artifacts."""
    return _template().render(
        m=m, version=version, error=error, written=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
        request_rows=_request_rows(m, records, gate), gate=_gate_section(gate) if gate else None,
        figures=_figures(gate, graph, timings), links=links or {},
        resource_rows=_resource_rows(m, timings, shards, graph, edit, resources))


def _request_rows(m: BatchManifest, records: Sequence[Any], gate: Mapping[str, Any] | None) -> list[list[Any]]:
    per_request = (gate or {}).get("per_request", {})
    rows = []
    for r in records:
        rid = r.request.request_id
        acc = per_request.get(rid, {})
        rows.append([rid, request_state(r, m.batch_id), len(m.items_of.get(rid, ())), acc.get("before"),
                     acc.get("after"), acc.get("registered_before"), acc.get("test_before"), acc.get("test_after"),
                     r.model_version, r.reason])
    return rows


def _gate_section(gate: Mapping[str, Any]) -> dict[str, Any]:
    """The gate's table (each set against its floor, or for ``earlier`` its ceiling), the same kept sets against
    the registered model where the gate measured them, and its decision."""
    cfg, since = gate["config"], gate.get("registered")
    registered = ({"version": since["version"], "rows": _score_rows(since["scores"], cfg),
                   "generation": _generation_rows(since["generation"], cfg)} if since else None)
    decision = "passed" if gate["passed"] else "failed: " + "; ".join(gate["reasons"])
    return {"rows": _score_rows(gate["scores"], cfg), "generation": _generation_rows(gate.get("generation", []), cfg),
            "registered": registered, "decision": decision}


def _score_rows(scores: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for s in scores:
        is_ceiling = s["items"] in _CEILINGS
        limit_name = _CEILINGS.get(s["items"]) or _FLOORS.get(s["items"])
        floor = cfg.get(limit_name) if limit_name else None
        rel = s["relative"]
        verdict = "-" if floor is None or rel != rel else (
            "pass" if (rel <= floor if is_ceiling else rel >= floor) else "FAIL")
        rows.append([_SET_LABEL.get(s["items"], s["items"]), s["modality"], s["n"], s["before"], s["after"],
                     rel, floor, verdict])
    return rows


def _generation_rows(generation: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any]) -> list[list[Any]]:
    """The kept sets' ROUGE-L against ``min_generation`` (none for a gate.json written before it was measured)."""
    floor = cfg.get("min_generation")
    return [[_SET_LABEL.get(g["items"], g["items"]), g["modality"], g["n"], g["rouge_l"], floor,
             "-" if floor is None else ("pass" if g["rouge_l"] >= floor else "FAIL")]
            for g in generation]


def _figures(gate: Mapping[str, Any] | None, graph: PathGraph | None, timings: Mapping[str, float]
             ) -> list[dict[str, str]]:
    """``src`` (a PNG data URI), ``alt`` and ``caption`` of each figure the batch has data for."""
    figures = []
    if gate:
        figures.append({"src": accuracy_figure(gate["scores"]), "alt": "accuracy before and after",
                        "caption": "Accuracy before and after the edit, per set and modality."})
    if graph is not None and len(graph):
        figures.append({"src": path_heatmap_figure(graph), "alt": "path graph heat map",
                        "caption": f"Path graph: {len(graph)} neurons over {len(graph.requests())} request(s). "
                                   "Colour: mean support (forget items sharing each kept neuron); labels: neurons "
                                   "kept per layer."})
    if timings:
        figures.append({"src": timings_figure(timings), "alt": "wall time per step", "caption": "Wall time per step."})
    return figures


def _resource_rows(m: BatchManifest, timings: Mapping[str, float], shards: Sequence[Mapping[str, Any]] | None,
                   graph: PathGraph | None, edit: Mapping[str, Any] | None, resources: Mapping[str, Any] | None
                   ) -> list[list[Any]]:
    rows = [["requests", len(m.requests)], ["rejected at planning", len(m.rejected)],
            ["items attributed and edited", len(m.forget)], ["items held during the edit", len(m.edit_retain)]]
    if shards:
        rows += [["attribution shards", len(shards)], ["attribution actors", len({s.get("actor") for s in shards})],
                 ["items that failed attribution", sum(len(s.get("failures", [])) for s in shards)]]
    if graph is not None:
        rows.append(["path-graph neurons", len(graph)])
    for key, label in (("launcher", "edit launcher"), ("n_actors", "actors asked for")):
        if resources and resources.get(key) is not None:
            rows.append([label, resources[key]])
    if edit:
        rows += [[label, edit[key]] for key, label in (
            ("world_size", "edit ranks (DeepSpeed world size)"), ("zero_stage", "ZeRO stage"),
            ("neurons", "neurons edited"), ("steps", "RMisU steps"), ("trainable_parameters", "trainable parameters"))
            if edit.get(key) is not None]
    if timings:
        rows += [[f"wall time: {step} (s)", round(sec, 2)] for step, sec in timings.items()]
        rows.append(["wall time: total (s)", round(sum(timings.values()), 2)])
    return rows


__all__ = ["accuracy_figure", "batch_html", "path_heatmap_figure", "support_matrix", "timings_figure"]
