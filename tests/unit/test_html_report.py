"""The HTML batch report on a hand-made batch: the heat map's numbers, the three figures, and what it must not
show (the personal data being forgotten, unescaped text)."""

from __future__ import annotations

import base64
import io
import math
import re
from types import SimpleNamespace

from PIL import Image

from mip_core.path_graph import GraphNode, PathGraph
from mip_core.service.batch import BatchManifest
from mip_core.service.html_report import batch_html, support_matrix

GRAPH = PathGraph("b1", (
    GraphNode("language", 0, 3, 2, 1.0, 0.6, ("a",)), GraphNode("language", 0, 7, 1, 0.5, 0.5, ("a",)),
    GraphNode("language", 2, 1, 4, 2.0, 0.9, ("a", "b")), GraphNode("vision", 1, 5, 3, 1.5, 0.7, ("b",)),
))
MANIFEST = BatchManifest(batch_id="b1", target_model="demo", base_version="v0001", base_uri="/m", dataset_uri="/d",
                         requests=("a", "b", "bad"), rejected={"bad": "unknown subjects ['p9']"},
                         forget=(("p1-name-text-qa", "a"), ("p2-name-mm-qa", "b")),
                         items_of={"a": ("p1-name-text-qa",), "b": ("p2-name-mm-qa",)}, edit_retain=("r1",),
                         eval_retain=("r2",), eval_utility=("u1",))
GATE = {"passed": True, "reasons": [], "config": {"min_forgetting": 0.5, "min_retention": 0.8, "min_utility": 0.8},
        "scores": [{"items": "forget", "modality": "text", "n": 1, "before": 1.0, "after": 0.0, "relative": 1.0},
                   {"items": "test", "modality": "text", "n": 1, "before": 1.0, "after": 1.0, "relative": 0.0},
                   {"items": "retain", "modality": "text", "n": 1, "before": 1.0, "after": 1.0, "relative": 1.0}],
        "per_request": {"a": {"n": 1, "before": 1.0, "after": 0.0}}}


def record(rid: str, state: str, reason: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(request=SimpleNamespace(request_id=rid, subjects=["p1"]), state=state, reason=reason,
                           model_version="v0002" if state == "done" else None, held_back_in=[])


def test_support_matrix_by_hand():
    towers, layers, support, neurons = support_matrix(GRAPH)
    assert towers == ["vision", "language"] and layers == [0, 1, 2]
    assert neurons == [[0, 1, 0], [2, 0, 1]]
    # mean support of the kept neurons: language layer 0 keeps two (support 2 and 1) -> 1.5
    assert math.isnan(support[0][0]) and support[0][1] == 3.0 and math.isnan(support[0][2])
    assert support[1][0] == 1.5 and math.isnan(support[1][1]) and support[1][2] == 4.0


def _images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b64)))
            for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_a_published_batch_has_its_tables_three_figures_and_resources():
    page = batch_html(MANIFEST, [record("a", "done"), record("b", "done"), record("bad", "rejected", "unknown")],
                      gate=GATE, version="v0002", error=None, timings={"plan": 0.1, "attribute": 12.0, "edit": 30.5},
                      shards=[{"actor": "h:1", "failures": []}, {"actor": "h:2", "failures": [["x", "oom"]]}],
                      graph=GRAPH, edit={"world_size": 2, "zero_stage": 3, "neurons": 4, "steps": 300},
                      resources={"launcher": "deepspeed", "n_actors": 2}, links={"manifest.json": "/s/b1/manifest"})
    assert page.startswith("<!DOCTYPE html>") and "published demo v0002" in page
    images = _images(page)
    assert len(images) == 3 and all(im.format == "PNG" and im.width > 300 and im.height > 100 for im in images)
    assert ['alt="accuracy before and after"', 'alt="path graph heat map"', 'alt="wall time per step"'] == \
        re.findall(r'alt="[^"]+"', page)
    for text in ("forget, held-out phrasings", "<td>pass</td>", "attribution actors", "edit ranks (DeepSpeed world "
                 "size)", "wall time: total (s)", "42.6", "rejected at planning"):
        assert text in page, text
    assert "http" not in page.replace("https://", "")  # self-contained: nothing fetched from elsewhere
    assert "p1-name-text-qa" not in page  # ids of requests, not of the facts being forgotten


def test_a_failed_batch_says_so_and_escapes_what_it_quotes():
    page = batch_html(MANIFEST, [record("a", "failed", "<script>alert(1)</script>")], gate=None, version=None,
                      error="edit step failed: <b>boom</b>", timings={"plan": 0.1}, graph=None)
    assert '<span class="badge bad">failed</span>' in page
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;boom&lt;/b&gt;" in page
    assert len(_images(page)) == 1  # timings only: no gate, no graph


def test_a_report_that_cannot_be_drawn_is_logged_not_raised(tmp_path, monkeypatch):
    import tasks.service as service_tasks
    from mip_core.service.store import ServiceStore

    said: list[str] = []
    logger = SimpleNamespace(info=lambda msg, *a: said.append(msg % a), error=lambda msg, *a: said.append(msg % a))
    store = ServiceStore(str(tmp_path))
    uri = service_tasks.write_html_report(store, MANIFEST, [record("a", "done")], logger, gate=GATE, version="v0002",
                                          error=None, timings={"plan": 0.1})
    assert uri == store.uri("batches/b1/report.html") and (tmp_path / "batches/b1/report.html").is_file()

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(service_tasks, "batch_html", broken)
    assert service_tasks.write_html_report(store, MANIFEST, [], logger, gate=None, version=None, error=None,
                                           timings={}) is None
    assert said[-1] == "batch b1: the HTML report could not be written: RuntimeError: no fonts"


def test_people_forgotten_earlier_are_checked_against_a_ceiling():
    """The ``earlier`` set's figure is a rise: it passes at or under ``max_relapse`` and fails above it."""
    def page(rise: float) -> str:
        gate = GATE | {"config": GATE["config"] | {"max_relapse": 0.05},
                       "scores": [*GATE["scores"], {"items": "earlier", "modality": "text", "n": 20, "before": 0.0,
                                                    "after": rise, "relative": rise}]}
        return batch_html(MANIFEST, [record("a", "done")], gate=gate, version="v0002", error=None, timings={})

    held = page(0.1)
    assert "forgotten by earlier versions" in held and held.count("<td>FAIL</td>") == 1
    assert page(0.05).count("<td>FAIL</td>") == 0


def test_kept_sets_generation_is_checked_against_its_floor():
    """``generation`` (mean ROUGE-L against the starting model's answers) gets its own table against
    ``min_generation``; a gate.json written before it was measured has no such table."""
    gate = GATE | {"config": GATE["config"] | {"min_generation": 0.6},
                   "generation": [{"items": "retain", "modality": "text", "n": 2, "rouge_l": 0.5},
                                  {"items": "utility", "modality": "text", "n": 1, "rouge_l": 0.7}]}
    page = batch_html(MANIFEST, [record("a", "done")], gate=gate, version="v0002", error=None, timings={})
    assert "<th>ROUGE-L</th>" in page and page.count("<td>FAIL</td>") == 1
    assert ('<td>other people</td><td>text</td><td class="num">2</td><td class="num">0.500</td><td class="num">0.600'
            '</td><td>FAIL</td>') in page.replace("\n", "")
    old = batch_html(MANIFEST, [record("a", "done")], gate=GATE, version="v0002", error=None, timings={})
    assert "ROUGE-L" not in old
