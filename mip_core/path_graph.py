"""Reduction of per-item neuron paths to one global path graph: pure functions, no I/O, no model, no tensors.

Method (docs/method.md section 4): per ``(tower, layer, neuron)``, ``support`` = distinct items that selected
it, ``score_sum`` and ``score_max`` of their scores, and the ids of the requests they came from. Selection is
the union of the per-item selections (the paper's rule); a retain-aware filter is available but off by
default, because the paper has nothing of the kind and it must be measured before it becomes a default.

Everything here is deterministic (order-independent sums, documented tie breaks), so a rerun on the same paths
gives the same graph and the same bytes on disk. Rules and formulas: ``docs/results.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa

from mip_core.errors import InputError
from mip_core.schemas import PATH_GRAPH_V1
from mip_core.types import TOWERS, ItemPath, Tower

__all__ = ["GraphNode", "PathGraph", "RetainFilter", "reduce_paths", "summarize"]


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One neuron of the path graph and the evidence for it.

    ``support``: distinct items that selected it; ``score_sum``: the sum of their scores (float64);
    ``score_max``: the largest of them (rounded to float32, as stored); ``request_ids``: sorted distinct ids
    of the requests those items came from (lineage; items without a request contribute none).
    """

    tower: Tower
    layer: int
    neuron: int
    support: int
    score_sum: float
    score_max: float
    request_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise InputError(f"graph node has tower {self.tower!r}; towers are {list(TOWERS)}")
        if self.support < 1:
            raise InputError(f"graph node {self.site_key} has support {self.support}; a kept neuron has >= 1")
        if not (math.isfinite(self.score_sum) and math.isfinite(self.score_max)):
            raise InputError(
                f"graph node {self.site_key} has a non-finite score ({self.score_sum}, {self.score_max})"
            )
        object.__setattr__(self, "request_ids", tuple(sorted(set(self.request_ids))))
        # rounded as stored, so a graph survives a write/read round trip exactly
        object.__setattr__(self, "score_max", float(np.float32(self.score_max)))

    @property
    def site_key(self) -> tuple[str, int, int]:
        return self.tower, self.layer, self.neuron

    @property
    def sort_key(self) -> tuple[str, int, float, int]:
        """Canonical order: tower, layer, then ``score_sum`` descending, ties by neuron id ascending."""
        return self.tower, self.layer, -self.score_sum, self.neuron


@dataclass(frozen=True, slots=True)
class PathGraph:
    """The reduced path graph of one run: what editing prunes and steers.

    ``nodes`` are kept in canonical order (:attr:`GraphNode.sort_key`; towers in string order, so ``language``
    before ``vision``), whatever order they are given in; a ``(tower, layer, neuron)`` may appear only once.
    """

    run_id: str
    nodes: tuple[GraphNode, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise InputError(f"run_id must be a non-empty string, got {self.run_id!r}")
        nodes = tuple(sorted(self.nodes, key=lambda n: n.sort_key))
        if len({n.site_key for n in nodes}) != len(nodes):
            raise InputError("a path graph lists some (tower, layer, neuron) twice; reduce the paths once")
        object.__setattr__(self, "nodes", nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def towers(self) -> list[Tower]:
        """Towers with at least one neuron, in string order."""
        return sorted({n.tower for n in self.nodes})

    def layers(self, tower: Tower) -> list[int]:
        """Layers of ``tower`` with at least one neuron, ascending."""
        return sorted({n.layer for n in self.nodes if n.tower == tower})

    def neurons(self, tower: Tower, layer: int) -> list[int]:
        """Neuron ids of the site ``(tower, layer)``, ascending (empty if the site has none)."""
        return sorted(n.neuron for n in self.nodes if n.tower == tower and n.layer == layer)

    def by_site(self) -> dict[tuple[Tower, int], list[int]]:
        """``{(tower, layer): ascending neuron ids}`` for every site with neurons: the input of editing."""
        sites: dict[tuple[Tower, int], list[int]] = {}
        for n in self.nodes:
            sites.setdefault((n.tower, n.layer), []).append(n.neuron)
        return {site: sorted(ids) for site, ids in sites.items()}

    def requests(self) -> list[str]:
        """Request ids with at least one neuron, sorted."""
        return sorted({r for n in self.nodes for r in n.request_ids})

    def for_request(self, request_id: str) -> PathGraph:
        """The neurons at least one item of ``request_id`` selected: that request's own path graph.

        Nodes keep the batch-wide evidence (``support``, scores, request ids); only membership is filtered, which
        is what selection needs (per-request editing, :mod:`mip_core.editing.methods`).
        """
        return PathGraph(f"{self.run_id}/{request_id}", tuple(n for n in self.nodes if request_id in n.request_ids))

    def to_table(self) -> pa.Table:
        """The graph as a :data:`mip_core.schemas.PATH_GRAPH_V1` table, rows in canonical order."""
        cols: dict[str, list[Any]] = {
            "run_id": [self.run_id] * len(self.nodes),
            "tower": [n.tower for n in self.nodes],
            "layer": [n.layer for n in self.nodes],
            "neuron": [n.neuron for n in self.nodes],
            "support": [n.support for n in self.nodes],
            "score_sum": [n.score_sum for n in self.nodes],
            "score_max": [n.score_max for n in self.nodes],
            "request_ids": [list(n.request_ids) for n in self.nodes],
        }
        return pa.Table.from_pydict(cols, schema=PATH_GRAPH_V1)

    @classmethod
    def from_table(cls, table: pa.Table, *, run_id: str | None = None) -> PathGraph:
        """Inverse of :meth:`to_table`. ``run_id`` is needed for an empty table; if given, rows must match it.

        Raises:
            InputError: other columns than ``PATH_GRAPH_V1``, several run ids, or a ``run_id`` that disagrees.
        """
        if table.schema.names != PATH_GRAPH_V1.names:
            raise InputError(
                f"a path graph table has columns {PATH_GRAPH_V1.names}, got {table.schema.names}"
            )
        cols = table.to_pydict()
        found = sorted(set(cols["run_id"]))
        if len(found) > 1 or (run_id is not None and found and found != [run_id]):
            raise InputError(f"path graph table has run ids {found}, expected only {run_id or 'one'}")
        rid = run_id if run_id is not None else (found[0] if found else None)
        if rid is None:
            raise InputError("an empty path graph table carries no run id; pass run_id=")
        nodes = tuple(
            GraphNode(cast(Tower, t), la, ne, su, ss, sm, tuple(rq))
            for t, la, ne, su, ss, sm, rq in zip(
                cols["tower"], cols["layer"], cols["neuron"], cols["support"], cols["score_sum"],
                cols["score_max"], cols["request_ids"], strict=True,
            )
        )  # fmt: skip
        return cls(run_id=rid, nodes=nodes)


@dataclass(frozen=True, slots=True)
class RetainFilter:
    """Retain-aware filtering (off unless passed): drop a neuron when, in its tower,

    ``(retain_support / n_retain_items) / (forget_support / n_forget_items) > max_ratio``,

    i.e. when retain items select it more often, relative to the size of each set, than ``max_ratio`` times as
    often as forget items do. ``max_ratio=0`` drops every neuron any retain item selected; ``inf`` drops
    nothing. A tower without retain items keeps all its neurons.
    """

    max_ratio: float

    def __post_init__(self) -> None:
        ratio = self.max_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or ratio < 0:
            raise InputError(f"RetainFilter.max_ratio must be a number >= 0 (inf allowed), got {ratio!r}")


def reduce_paths(
    paths: Iterable[ItemPath],
    *,
    run_id: str,
    retain_paths: Iterable[ItemPath] | None = None,
    retain_filter: RetainFilter | None = None,
) -> PathGraph:
    """Reduce per-item paths (the forget set) to a path graph: the union of their neurons, with evidence.

    Per ``(tower, layer, neuron)``: ``support`` = #distinct items selecting it, ``score_sum`` = fsum of their
    scores (exactly rounded, so independent of input order), ``score_max``, sorted distinct request ids. An
    item is identified by ``(tower, item_id)``: the same item given again (e.g. asked for by two requests)
    counts once and adds its request id, but only if its nodes are the same. ``retain_paths`` are used only by
    ``retain_filter``.

    Args:
        paths: the forget items' paths.
        run_id: the run the graph belongs to.
        retain_paths: paths of retain items, scored the same way.
        retain_filter: drop neurons retain items select too often (:class:`RetainFilter`); None = union.
    Raises:
        InputError: an unknown tower, a non-finite score, a neuron listed twice in one layer of one path,
            the same item given with different nodes, or ``retain_filter`` without ``retain_paths``.

    >>> from mip_core.types import PathNode
    >>> p = ItemPath("a", "r1", "language", (PathNode(layer=0, rank=0, neuron=7, score=0.5),))
    >>> reduce_paths([p], run_id="demo").by_site()
    {('language', 0): [7]}
    """
    if retain_filter is not None and retain_paths is None:
        raise InputError("retain_filter needs retain_paths (the retain items' paths, scored the same way)")
    items, requests = _items(paths, "forget")
    acc: dict[tuple[str, int, int], list[Any]] = {}  # site_key -> [scores, request ids]
    for key, item_nodes in items.items():
        for layer, neuron, score in item_nodes:
            entry = acc.setdefault((key[0], layer, neuron), [[], set()])
            entry[0].append(score)
            entry[1].update(requests[key])
    if retain_filter is not None and retain_paths is not None:
        acc = _retain_filtered(acc, items, _items(retain_paths, "retain")[0], retain_filter)
    nodes = tuple(
        GraphNode(
            tower=cast(Tower, tower), layer=layer, neuron=neuron, support=len(scores),
            score_sum=math.fsum(scores), score_max=max(scores), request_ids=tuple(sorted(reqs)),
        )
        for (tower, layer, neuron), (scores, reqs) in acc.items()
    )  # fmt: skip
    return PathGraph(run_id=run_id, nodes=nodes)


def summarize(graph: PathGraph, top: int = 5) -> str:
    """What ``mip paths show`` prints: per site the union size and the top neurons by ``score_sum``; totals.

    Lines look like ``language L0  union=12  top: 211(s=5, 3.2e-01) 17(s=4, 2.9e-01)`` (``s`` = support, then
    ``score_sum``), in the graph's canonical order.
    """
    if type(top) is not int or top < 0:
        raise InputError(f"top must be an int >= 0, got {top!r}")
    if not graph.nodes:
        return f"path graph {graph.run_id}: empty (no neurons selected)"
    lines = [f"path graph {graph.run_id}"]
    sites: dict[tuple[str, int], list[GraphNode]] = {}
    for n in graph.nodes:  # canonical order: within a site, score_sum descending
        sites.setdefault((n.tower, n.layer), []).append(n)
    for (tower, layer), nodes in sites.items():
        line = f"{tower:<8} {'L' + str(layer):<3} union={len(nodes)}"
        if top:
            line += "  top: " + " ".join(f"{n.neuron}(s={n.support}, {n.score_sum:.1e})" for n in nodes[:top])
        lines.append(line)
    per_tower = [
        f"{t} {_plural(sum(1 for n in graph.nodes if n.tower == t), 'neuron')} in "
        f"{_plural(len(graph.layers(t)), 'layer')}"
        for t in graph.towers()
    ]
    lines.append(
        f"total: {_plural(len(graph), 'neuron')} at {_plural(len(sites), 'site')} ({'; '.join(per_tower)})"
    )
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _items(
    paths: Iterable[ItemPath], which: str
) -> tuple[dict[tuple[str, str], tuple[tuple[int, int, float], ...]], dict[tuple[str, str], set[str]]]:
    """``{(tower, item_id): sorted (layer, neuron, score)}`` and each item's request ids (merged)."""
    items: dict[tuple[str, str], tuple[tuple[int, int, float], ...]] = {}
    requests: dict[tuple[str, str], set[str]] = {}
    for path in paths:
        if path.tower not in TOWERS:
            raise InputError(
                f"{which} item {path.item_id!r} has tower {path.tower!r}; towers are {list(TOWERS)}"
            )
        nodes = tuple(sorted((n.layer, n.neuron, float(n.score)) for n in path.nodes))
        if any(not math.isfinite(s) for _, _, s in nodes):
            raise InputError(
                f"{which} item {path.item_id!r} ({path.tower}) has a non-finite score; fix attribution"
            )
        if len({(la, ne) for la, ne, _ in nodes}) != len(nodes):
            raise InputError(
                f"{which} item {path.item_id!r} ({path.tower}) selects a neuron twice in one layer"
            )
        key = (path.tower, path.item_id)
        if key in items and items[key] != nodes:
            raise InputError(
                f"{which} item {path.item_id!r} ({path.tower}) is given twice with different paths; "
                "pass each item once (or identical paths when several requests share it)"
            )
        items[key] = nodes
        requests.setdefault(key, set()).update([path.request_id] if path.request_id is not None else [])
    return items, requests


def _retain_filtered(
    acc: dict[tuple[str, int, int], list[Any]],
    forget: dict[tuple[str, str], Any],
    retain: dict[tuple[str, str], tuple[tuple[int, int, float], ...]],
    rule: RetainFilter,
) -> dict[tuple[str, int, int], list[Any]]:
    n_forget = _count_by_tower(forget)
    n_retain = _count_by_tower(retain)
    retain_support: dict[tuple[str, int, int], int] = {}
    for (tower, _), nodes in retain.items():
        for layer, neuron, _ in nodes:
            retain_support[(tower, layer, neuron)] = retain_support.get((tower, layer, neuron), 0) + 1

    def keep(site: tuple[str, int, int], forget_support: int) -> bool:
        tower = site[0]
        if not n_retain.get(tower):
            return True
        ratio = (retain_support.get(site, 0) / n_retain[tower]) / (forget_support / n_forget[tower])
        return ratio <= rule.max_ratio

    return {site: entry for site, entry in acc.items() if keep(site, len(entry[0]))}


def _count_by_tower(items: dict[tuple[str, str], Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tower, _ in items:
        counts[tower] = counts.get(tower, 0) + 1
    return counts
