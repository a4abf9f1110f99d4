"""Path-search speed and fidelity against the research code's algorithm, and storage (``make bench``).

Per tower, on the demo's model (``demo_out/vanilla`` if ``make demo`` ran, else a random model of the same size;
speed does not depend on the weights, fidelity does), one process, one thread, the same retain items for all:

- one row per implementation and setting in ``benches/results/attribution.json`` (``{"rows": [...]}``):
  ``project`` (``mip_core.attribution.path_search`` at several quadrature rules, node counts ``m`` and items
  per pass), ``research_ref`` (``research_ref.py``: the research code's algorithm as it ships, ``m = 4``) and
  ``naive`` (``naive_attribution.py``: the project's definition run one item and one node at a time);
- ``items_per_s``: the fastest of ``--repeats`` rounds, each round running the research reference and every
  setting once in turn (``time_spread``: slowest over fastest); settings of 64 nodes or more run once;
- ``completeness_gap``: ``sum |Q - dF| / sum |dF|`` over items and layers, where ``Q`` is the quadrature's sum of
  ``a * g`` over every neuron the pass scales and ``dF`` the change of the implementation's own objective
  between the original activations and those neurons at zero (each implementation's integral as it defines
  it). Weighted by ``|dF|`` because most layers of the demo model barely move the answer (``dF`` near 0) and a
  plain mean of ratios would be decided by them; ``completeness_gap_per_layer`` gives the same per layer;
- ``top_k_overlap_with_default``: per item and layer, the Jaccard overlap of the neurons chosen with those the
  default setting chose, averaged (1.0: the same paths); ``same_top_k_as_default``, for the naive search,
  on how many items it picks exactly the default's neurons;
- storage: bytes per item of the per-item path dataset and of the reduced graph, against dense bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import research_ref  # noqa: E402
from naive_attribution import naive_path  # noqa: E402

from mip_core.attribution import AttributionConfig, attribute_items, path_search  # noqa: E402
from mip_core.attribution.path_search import completeness  # noqa: E402
from mip_core.benchmark import load_benchmark, make_benchmark  # noqa: E402
from mip_core.modeling import build_tiny, encode, load_model  # noqa: E402
from mip_core.path_graph import reduce_paths  # noqa: E402
from mip_core.parquet_io import write_item_paths, write_path_graph  # noqa: E402
from mip_core.types import PathNode  # noqa: E402

#: ``rule:m:items_per_pass``; the first is the library default, the reference for neuron agreement.
DEFAULT_SETTINGS = ("right:4:4,right:4:8,gauss_legendre:2:4,gauss_legendre:2:8,gauss_legendre:2:16,"
                    "gauss_legendre:1:8,gauss_legendre:4:4,right:64:1,right:256:1,log_trapezoid:512:1,"
                    "log_trapezoid:1024:1")
SLOW_NODES = 64  # settings with at least this many nodes are timed and checked on --slow-items items
Paths = list[list[PathNode]]


class Timing(NamedTuple):
    seconds: float  # the fastest run
    spread: float  # slowest over fastest
    paths: Paths  # the last run's


def time_interleaved(runs: Mapping[str, Callable[[], Paths]], repeats: int) -> dict[str, Timing]:
    """Each of ``repeats`` rounds runs every implementation once, in turn, after one warm-up each; the fastest
    round counts, as ``timeit`` reports. Interleaving makes a slow spell of a shared 2-core machine hit every
    implementation alike, so the speed-ups (the figures that matter) are stable where absolute times are not."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    paths: dict[str, Paths] = {}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            paths[name] = run()
            seconds[name].append(time.perf_counter() - t0)
    return {name: Timing(min(t), max(t) / min(t), paths[name]) for name, t in seconds.items()}


def gap_figures(pairs: Sequence[Sequence[tuple[float, float]]]) -> dict[str, object]:
    """``pairs[item][layer] = (Q, dF)`` -> the ``|dF|``-weighted gap, overall and per layer."""
    def ratio(cells: list[tuple[float, float]]) -> float:
        den = sum(abs(d) for _, d in cells)
        return sum(abs(q - d) for q, d in cells) / den if den > 0 else float("nan")

    layers = len(pairs[0])
    return {"completeness_gap": ratio([c for item in pairs for c in item]),
            "completeness_gap_per_layer": [ratio([item[layer] for item in pairs]) for layer in range(layers)],
            "gap_items": len(pairs)}


def overlap(paths: Paths, reference: Paths) -> float:
    """Mean Jaccard overlap of each item's per-layer neuron sets with the reference's (same items, same order)."""
    scores = []
    for got, want in zip(paths, reference, strict=False):
        for layer in sorted({n.layer for n in want}):
            a = {n.neuron for n in got if n.layer == layer}
            b = {n.neuron for n in want if n.layer == layer}
            scores.append(len(a & b) / len(a | b))
    return sum(scores) / len(scores)


def project_gaps(model, adapter, examples, paths: Paths, tower: str, cfg: AttributionConfig, pad_id: int):
    """Per item and layer ``(Q, dF)`` of the library's own integral, along each item's own greedy path."""
    out = []
    for example, nodes in zip(examples, paths, strict=True):
        cells = []
        for site in adapter.sites(tower):
            earlier = [{layer: [n.neuron for n in nodes if n.layer == layer] for layer in range(site.layer)}]
            q, d = completeness(model, adapter, [example], site, steps=cfg.steps, rule=cfg.rule, path=earlier,
                                pad_token_id=pad_id)
            cells.append((float(q[0]), float(d[0])))
        out.append(cells)
    return out


def project_run(model, adapter, examples, tower: str, cfg: AttributionConfig, pad_id: int
                ) -> Callable[[], Paths]:
    def run() -> Paths:
        found: Paths = []
        for start in range(0, len(examples), cfg.batch_items):
            found += path_search(model, adapter, examples[start:start + cfg.batch_items], tower, cfg,
                                 pad_token_id=pad_id)
        return found

    return run


def research_run(model, adapter, examples, tower: str, pad_id: int) -> Callable[[], Paths]:
    return lambda: [[n for layer in research_ref.research_path(model, adapter, e, tower, 4, 5, pad_id)
                     for n in layer] for e in examples]


def parse(setting: str) -> AttributionConfig:
    rule, m, per_pass = setting.split(":")
    return AttributionConfig(steps=int(m), rule=rule, batch_items=int(per_pass))  # type: ignore[arg-type]


def project_row(model, adapter, examples, tower: str, cfg: AttributionConfig, timing: Timing, n_items: int,
                n_gap: int, pad_id: int) -> dict[str, object]:
    gaps = project_gaps(model, adapter, examples[:n_gap], timing.paths[:n_gap], tower, cfg, pad_id)
    return {"tower": tower, "impl": "project", "m": cfg.steps, "rule": cfg.rule, "batch_items": cfg.batch_items,
            "items": n_items, "items_per_s": n_items / timing.seconds, "time_spread": timing.spread
            } | gap_figures(gaps)


def research_row(model, adapter, examples, tower: str, timing: Timing, n_gap: int, pad_id: int
                 ) -> dict[str, object]:
    gaps = []
    for e in examples[:n_gap]:
        by_layer = research_ref.research_path(model, adapter, e, tower, 4, 5, pad_id)
        gaps.append(research_ref.completeness(model, adapter, e, tower, 4, by_layer, pad_id))
    return {"tower": tower, "impl": "research_ref", "m": 4, "rule": "left", "batch_items": 1,
            "items": len(examples), "items_per_s": len(examples) / timing.seconds, "time_spread": timing.spread
            } | gap_figures(gaps)


def naive_row(model, adapter, examples, tower: str, reference: Paths, reference_gap: Mapping[str, object],
              args, pad_id: int) -> dict[str, object]:
    """The default's definition, one item and one node per pass: its gap is the default's by construction."""
    items = examples[: args.naive_items]
    t0 = time.perf_counter()
    paths = [[n for layer in naive_path(model, adapter, e, tower, 4, 5, pad_id) for n in layer] for e in items]
    seconds = time.perf_counter() - t0
    same = sum([n.neuron for n in got] == [n.neuron for n in ref]
               for got, ref in zip(paths, reference, strict=False))
    return {"tower": tower, "impl": "naive", "m": 4, "rule": "right", "batch_items": 1, "items": len(items),
            "items_per_s": len(items) / seconds, "same_top_k_as_default": f"{same}/{len(items)}"} | {
        k: reference_gap[k] for k in ("completeness_gap", "completeness_gap_per_layer", "gap_items")}


def tower_rows(model, adapter, examples, tower: str, args, pad_id: int) -> list[dict[str, object]]:
    """The research reference and the fast settings timed interleaved; the slow ones once each; then the gaps."""
    configs = [parse(setting) for setting in args.settings.split(",")]
    fast = [c for c in configs if c.steps < SLOW_NODES]
    runs = {"research_ref": research_run(model, adapter, examples[: args.ref_items], tower, pad_id)}
    runs |= {repr(c): project_run(model, adapter, examples, tower, c, pad_id) for c in fast}
    timings = time_interleaved(runs, args.repeats)
    for c in configs:
        if c.steps >= SLOW_NODES:
            timings[repr(c)] = time_interleaved(
                {"slow": project_run(model, adapter, examples[: args.slow_items], tower, c, pad_id)}, 1)["slow"]
    rows = []
    for c in configs:
        slow = c.steps >= SLOW_NODES
        rows.append(project_row(model, adapter, examples, tower, c, timings[repr(c)],
                                args.slow_items if slow else len(examples),
                                args.slow_items if slow else args.gap_items, pad_id))
        rows[-1]["top_k_overlap_with_default"] = overlap(timings[repr(c)].paths, timings[repr(configs[0])].paths)
        print(json.dumps(rows[-1]), flush=True)
    rows.append(research_row(model, adapter, examples[: args.ref_items], tower, timings["research_ref"],
                             args.gap_items, pad_id))
    rows.append(naive_row(model, adapter, examples, tower, timings[repr(configs[0])].paths, rows[0], args, pad_id))
    for row in rows[-2:]:
        print(json.dumps(row), flush=True)
    return rows


def storage(model, adapter, processor, bench, items, tower: str, tmp: Path) -> dict[str, float]:
    """Bytes per item of the per-item path dataset and of the reduced graph (default setting)."""
    paths, failures = attribute_items(model, adapter, processor, bench, items, AttributionConfig())
    assert not failures, failures
    ds = write_item_paths(paths, str(tmp / f"{tower}_items"), run_id="bench")
    write_path_graph(reduce_paths(paths, run_id="bench"), str(tmp / f"{tower}_graph"))
    size = {name: sum(f.stat().st_size for f in (tmp / f"{tower}_{name}").rglob("*.parquet"))
            for name in ("items", "graph")}
    site = adapter.sites(tower)[0]
    return {"item_paths_bytes_per_item": size["items"] / len(items), "rows": ds.n_rows,
            "graph_bytes_per_item": size["graph"] / len(items),
            "dense_bf16_bytes_per_item": len(adapter.sites(tower)) * site.d_mlp * 2}


def load(args, tmp: Path):
    if Path(args.model, "model.safetensors").is_file():
        loaded = load_model(args.model)
        return loaded.model, loaded.processor, loaded.adapter, args.model
    from mip_core.adapters import get_adapter

    model, processor = build_tiny("qwen2_5_vl", size="demo")
    return model, processor, get_adapter(model), "random qwen2_5_vl (demo size)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo_out/vanilla")
    parser.add_argument("--bench", default="demo_out/bench")
    parser.add_argument("--items", type=int, default=32, help="items per tower timed for the project rows")
    parser.add_argument("--gap-items", type=int, default=8, help="items per tower checked for completeness")
    parser.add_argument("--ref-items", type=int, default=8, help="items per tower for the research reference")
    parser.add_argument("--naive-items", type=int, default=4, help="items per tower for the naive search")
    parser.add_argument("--slow-items", type=int, default=4, help=f"items for settings of >= {SLOW_NODES} nodes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS)
    parser.add_argument("--json", default="benches/results/attribution.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    model, processor, adapter, model_desc = load(args, tmp)
    bench_dir = args.bench if Path(args.bench, "manifest.json").is_file() else str(tmp / "bench")
    if bench_dir != args.bench:
        make_benchmark(bench_dir, 100, 0)
    bench = load_benchmark(bench_dir)
    pad_id = processor.tokenizer.pad_token_id
    rows: list[dict[str, object]] = []
    result: dict[str, object] = {
        "model": model_desc, "machine": f"{platform.processor() or platform.machine()}, 1 torch thread",
        "torch": torch.__version__, "top_k": 5, "items": "retain items of the 10 % split", "rows": rows}
    for tower, modality in (("language", "text"), ("vision", "multimodal")):
        items = bench.split_items("retain", forget_pct=10, modality=modality)[: args.items]
        examples = [encode(processor, it.question, bench.load_image(it) if it.image else None, it.answer)
                    for it in items]
        rows += tower_rows(model, adapter, examples, tower, args, pad_id)
        result[f"storage_{tower}"] = storage(model, adapter, processor, bench, items[:16], tower, tmp)
    for row in rows:
        ref = next(r for r in rows if r["impl"] == "research_ref" and r["tower"] == row["tower"])
        row["speedup_vs_research_ref"] = row["items_per_s"] / ref["items_per_s"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
