"""Unlearn a benchmark forget split with one method, and save the result as a plain HF checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mip_core.attribution import AttributionConfig, attribute_items
from mip_core.benchmark import Benchmark
from mip_core.editing.base import EditSummary
from mip_core.editing.data import request_of, unlearn_data
from mip_core.editing.methods import METHODS, get_method
from mip_core.editing.rmisu import RMisUConfig
from mip_core.errors import InputError
from mip_core.modeling.io import LoadedModel, save_model
from mip_core.path_graph import PathGraph, reduce_paths
from mip_core.storage import filesystem

UNLEARN_LOG = "unlearn.json"


def forget_graph(loaded: LoadedModel, bench: Benchmark, *, forget_pct: int, cfg: AttributionConfig | None = None,
                 run_id: str = "unlearn") -> PathGraph:
    """Attribute the forget split and reduce it to a path graph (the union rule); any failed item is an error.

    Each forget person is one request (:func:`~mip_core.editing.data.request_of`), recorded on the graph's nodes,
    so per-request editing can take each person's own paths from the one graph.
    """
    items = bench.split_items("forget", forget_pct=forget_pct)
    paths, failures = attribute_items(loaded.model, loaded.adapter, loaded.processor, bench, items, cfg,
                                      request_ids={it.item_id: request_of(it) for it in items})
    if failures:
        raise InputError(f"attribution failed for {len(failures)} of {len(items)} forget items; first: "
                         f"{failures[0].reason}")
    return reduce_paths(paths, run_id=run_id)


def unlearn_benchmark(loaded: LoadedModel, bench: Benchmark, method: str, *, forget_pct: int = 5, seed: int = 0,
                      graph: PathGraph | None = None, rmisu: RMisUConfig | None = None,
                      edit: dict[str, Any] | None = None, attribution: AttributionConfig | None = None,
                      log: Callable[[str], None] = print) -> tuple[EditSummary, PathGraph | None]:
    """Make ``loaded.model`` forget the forget split of ``bench`` (subset ``seed``) with ``method``, in place.

    A path-based method without ``graph`` attributes the forget items first. Returns the summary and the graph used.
    """
    if method not in METHODS:
        raise InputError(f"--method {method!r} is not a method; choose from {', '.join(METHODS)}")
    b = bench.with_forget_seed(seed)
    if graph is None and METHODS[method].needs_graph:
        log(f"attributing the forget split ({forget_pct} %, subset {seed}) for {method!r}")
        graph = forget_graph(loaded, b, forget_pct=forget_pct, cfg=attribution, run_id=f"unlearn-{method}")
        log(f"path graph: {len(graph)} neurons")
    data = unlearn_data(loaded.processor, b, b.split_items("forget", forget_pct=forget_pct),
                        b.split_items("retain", forget_pct=forget_pct))
    summary = get_method(method, rmisu=rmisu, edit_overrides=edit, seed=seed).run(
        loaded.model, loaded.adapter, data, graph=graph, log=log)
    return summary, graph


def save_unlearned(loaded: LoadedModel, summary: EditSummary, uri: str, *, lineage: dict[str, Any]) -> None:
    """Save the edited model (safetensors, loadable by ``from_pretrained`` alone), then ``unlearn.json`` beside it."""
    save_model(loaded.model, loaded.processor, uri)
    fs, path = filesystem(uri)
    with fs.open(f"{path.rstrip('/')}/{UNLEARN_LOG}", "w") as f:
        f.write(json.dumps({**summary.to_dict(), "lineage": lineage}, indent=1, default=str) + "\n")


__all__ = ["UNLEARN_LOG", "forget_graph", "save_unlearned", "unlearn_benchmark"]
