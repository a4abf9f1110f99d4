"""Path-graph reduction on hand-made paths: every number below is worked out by hand in the comments."""

from __future__ import annotations

import math
import random

import pytest

from mip_core.errors import InputError
from mip_core.path_graph import GraphNode, PathGraph, RetainFilter, reduce_paths, summarize
from mip_core.types import ItemPath
from path_builders import item_path


_path = item_path


# language L0: 7 <- a .5, b .25 | 3 <- a .25, c .25 | 5 <- b .75 | 1 <- c .125
# language L1: 2 <- a 1.0, b .5 | 9 <- b .5 | 4 <- c .25 ; vision L0: 4 <- d 2.0
FORGET = [
    _path("a", "r1", "language", [(7, 0.5), (3, 0.25)], [(2, 1.0)]),
    _path("b", "r2", "language", [(5, 0.75), (7, 0.25)], [(2, 0.5), (9, 0.5)]),
    _path("c", None, "language", [(3, 0.25), (1, 0.125)], [(4, 0.25)]),
    _path("d", "r1", "vision", [(4, 2.0)]),
]
EXPECTED = [  # tower, layer, then score_sum descending; the tie of 5 and 7 (0.75) goes to the lower neuron id
    GraphNode("language", 0, 5, 1, 0.75, 0.75, ("r2",)),
    GraphNode("language", 0, 7, 2, 0.75, 0.5, ("r1", "r2")),
    GraphNode("language", 0, 3, 2, 0.5, 0.25, ("r1",)),  # c has no request: no lineage entry
    GraphNode("language", 0, 1, 1, 0.125, 0.125, ()),
    GraphNode("language", 1, 2, 2, 1.5, 1.0, ("r1", "r2")),
    GraphNode("language", 1, 9, 1, 0.5, 0.5, ("r2",)),
    GraphNode("language", 1, 4, 1, 0.25, 0.25, ()),
    GraphNode("vision", 0, 4, 1, 2.0, 2.0, ("r1",)),
]


def test_reduction_matches_hand_computation():
    graph = reduce_paths(FORGET, run_id="run-1")
    assert graph.run_id == "run-1"
    assert list(graph.nodes) == EXPECTED


def test_union_semantics():
    graph = reduce_paths(FORGET, run_id="r")
    union = {(p.tower, n.layer, n.neuron) for p in FORGET for n in p.nodes}
    assert {n.site_key for n in graph.nodes} == union
    assert graph.by_site() == {("language", 0): [1, 3, 5, 7], ("language", 1): [2, 4, 9], ("vision", 0): [4]}
    assert graph.neurons("language", 1) == [2, 4, 9] and graph.neurons("vision", 5) == []
    assert graph.layers("language") == [0, 1] and graph.towers() == ["language", "vision"]


def test_tie_break_is_neuron_ascending_and_order_independent():
    tied = [_path(f"i{n}", None, "language", [(n, 0.5)]) for n in (9, 2, 5)]
    assert [n.neuron for n in reduce_paths(tied, run_id="r").nodes] == [2, 5, 9]
    shuffled = FORGET[:]
    random.Random(1).shuffle(shuffled)
    assert reduce_paths(shuffled, run_id="r") == reduce_paths(FORGET, run_id="r")


def test_score_sum_does_not_depend_on_summation_order():
    scores = [0.1, 0.2, 0.3]  # 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1 in floats; fsum is exact
    fwd = reduce_paths([_path(f"i{k}", None, "vision", [(0, s)]) for k, s in enumerate(scores)], run_id="r")
    rev = reduce_paths(
        [_path(f"i{k}", None, "vision", [(0, s)]) for k, s in enumerate(reversed(scores))], run_id="r"
    )
    assert fwd.nodes[0].score_sum == rev.nodes[0].score_sum == math.fsum(scores)


def test_same_item_from_two_requests_counts_once():
    again = _path("a", "r9", "language", [(7, 0.5), (3, 0.25)], [(2, 1.0)])
    graph = reduce_paths([*FORGET, again], run_id="r")
    node = next(n for n in graph.nodes if n.site_key == ("language", 0, 7))
    assert (node.support, node.score_sum, node.request_ids) == (2, 0.75, ("r1", "r2", "r9"))
    with pytest.raises(InputError, match="different paths"):
        reduce_paths([*FORGET, _path("a", "r9", "language", [(8, 0.5)])], run_id="r")


def test_empty_input_gives_empty_graph():
    graph = reduce_paths([], run_id="r")
    assert graph == PathGraph(run_id="r") and len(graph) == 0 and graph.by_site() == {}
    assert summarize(graph) == "path graph r: empty (no neurons selected)"
    assert reduce_paths([ItemPath("q", None, "vision", ())], run_id="r").nodes == ()


# retain (language, 2 items): 7@L0 <- x, y ; 9@L1 <- x. Forget has 3 language items.
# 7@L0: (2/2) / (2/3) = 1.5 ; 9@L1: (1/2) / (1/3) = 1.5 ; every other neuron: 0.
RETAIN = [
    _path("x", None, "language", [(7, 9.0)], [(9, 9.0)]),
    _path("y", None, "language", [(7, 9.0)]),
]


def test_retain_filter_drops_exactly_the_expected_neurons():
    dropped = {("language", 0, 7), ("language", 1, 9)}
    for ratio, expect_dropped in [(1.0, dropped), (0.0, dropped), (2.0, set()), (math.inf, set())]:
        graph = reduce_paths(FORGET, run_id="r", retain_paths=RETAIN, retain_filter=RetainFilter(ratio))
        assert list(graph.nodes) == [n for n in EXPECTED if n.site_key not in expect_dropped], ratio
    # a tower without retain items keeps everything, even at max_ratio=0
    only_vision = reduce_paths(FORGET, run_id="r", retain_paths=RETAIN, retain_filter=RetainFilter(0.0))
    assert only_vision.neurons("vision", 0) == [4]


def test_retain_filter_off_is_a_no_op():
    plain = reduce_paths(FORGET, run_id="r")
    assert reduce_paths(FORGET, run_id="r", retain_paths=RETAIN) == plain
    assert reduce_paths(FORGET, run_id="r", retain_paths=[], retain_filter=RetainFilter(0.0)) == plain


@pytest.mark.parametrize("bad", [-0.5, math.nan, "1", True, None])
def test_retain_filter_is_validated(bad):
    with pytest.raises(InputError, match="max_ratio"):
        RetainFilter(bad)  # type: ignore[arg-type]


def test_invalid_input_is_rejected():
    with pytest.raises(InputError, match="retain_paths"):
        reduce_paths(FORGET, run_id="r", retain_filter=RetainFilter(1.0))
    with pytest.raises(InputError, match="non-finite"):
        reduce_paths([_path("q", None, "language", [(1, math.nan)])], run_id="r")
    with pytest.raises(InputError, match="twice in one layer"):
        reduce_paths([_path("q", None, "language", [(1, 0.5), (1, 0.25)])], run_id="r")
    with pytest.raises(InputError, match="tower"):
        reduce_paths([_path("q", None, "audio", [(1, 0.5)])], run_id="r")
    with pytest.raises(InputError, match="run_id"):
        reduce_paths(FORGET, run_id="")
    with pytest.raises(InputError, match="twice"):
        PathGraph(run_id="r", nodes=(EXPECTED[0], EXPECTED[0]))


def test_table_round_trip():
    graph = reduce_paths(FORGET, run_id="r")
    table = graph.to_table()
    assert table.column("neuron").to_pylist() == [5, 7, 3, 1, 2, 9, 4, 4]
    assert PathGraph.from_table(table) == graph
    assert PathGraph.from_table(PathGraph(run_id="e").to_table(), run_id="e") == PathGraph(run_id="e")
    with pytest.raises(InputError, match="run_id"):
        PathGraph.from_table(PathGraph(run_id="e").to_table())
    with pytest.raises(InputError, match="run ids"):
        PathGraph.from_table(table, run_id="other")


def test_graph_normalises_its_nodes():
    graph = PathGraph(run_id="r", nodes=tuple(reversed(EXPECTED)))
    assert list(graph.nodes) == EXPECTED
    node = GraphNode("vision", 0, 1, 1, 0.1, 0.1, ("b", "a", "b"))
    assert node.request_ids == ("a", "b") and node.score_max == pytest.approx(0.1, rel=1e-7)


def test_summarize_lines():
    text = summarize(reduce_paths(FORGET, run_id="run-1"), top=2)
    assert text.splitlines() == [
        "path graph run-1",
        "language L0  union=4  top: 5(s=1, 7.5e-01) 7(s=2, 7.5e-01)",
        "language L1  union=3  top: 2(s=2, 1.5e+00) 9(s=1, 5.0e-01)",
        "vision   L0  union=1  top: 4(s=1, 2.0e+00)",
        "total: 8 neurons at 3 sites (language 7 neurons in 2 layers; vision 1 neuron in 1 layer)",
    ]
    assert "top:" not in summarize(reduce_paths(FORGET, run_id="r"), top=0)
    with pytest.raises(InputError, match="top"):
        summarize(reduce_paths(FORGET, run_id="r"), top=-1)
