"""Variations of the path-restricted edit, each beside the random-neuron control at the same budget.

The evidence behind the defaults of ``RMisUConfig`` / ``EditConfig`` (BENCHMARKS.md, section 3). Each
variation changes one thing from the defaults; ``random`` gets the same edit on as many random neurons per site.
Forget and retain splits only (MC accuracy, ROUGE-L), so a variation costs one edit plus ~8 s of evaluation.

    python benches/editing_variations.py --model demo_out/vanilla --bench demo_out/bench --forget 5 \
        --subsets 0 --out benches/results/variations05.json [--only NAME ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from functools import partial

import torch

from mip_core.attribution import AttributionConfig, attribute_items
from mip_core.attribution.items import tower_for
from mip_core.benchmark import load_benchmark
from mip_core.compare import harmonic_mean
from mip_core.editing.data import request_of, unlearn_data
from mip_core.editing.methods import EditConfig, MipEditor, RandomControl, paper_config, path_edit
from mip_core.editing.selection import contrastive_selection, dense_scores, from_graph, random_like
from mip_core.evaluation import evaluate, forgetting_rate, retention
from mip_core.modeling import load_model
from mip_core.path_graph import RetainFilter, reduce_paths

BASE = EditConfig()


def _rmisu(**kw: object) -> EditConfig:
    return replace(BASE, rmisu=replace(BASE.rmisu, **kw))


# name -> (EditConfig, top_k, retain filter max_ratio, "contrastive" (continuous forget - retain scores at the
# union's per-site budget) or None)
VARIATIONS = {
    "default": (BASE, 5, None),
    "paper (mip_paper)": (paper_config(), 5, None),
    "prune first": (replace(BASE, prune=True), 5, None),
    "no retain CE": (_rmisu(retain_ce_weight=0.0), 5, None),
    "retain CE 0.1": (_rmisu(retain_ce_weight=0.1), 5, None),
    "retain CE 1": (_rmisu(retain_ce_weight=1.0), 5, None),
    "target x2": (_rmisu(target_scale=2.0), 5, None),
    "target x10": (_rmisu(target_scale=10.0), 5, None),
    "layer 1": (_rmisu(layer=1), 5, None),
    "layer 2": (_rmisu(layer=2), 5, None),
    "layer 50%": (_rmisu(layer_fraction=0.5), 5, None),
    "layer 62%": (_rmisu(layer_fraction=0.625), 5, None),
    "last layer": (_rmisu(layer_fraction=1.0), 5, None),
    "top-k 1": (BASE, 1, None),
    "top-k 2": (BASE, 2, None),
    "top-k 2, layer 2": (_rmisu(layer=2), 2, None),
    "top-k 10": (BASE, 10, None),
    "retain filter (ratio 1)": (BASE, 5, 1.0),
    "retain filter (ratio 0.25)": (BASE, 5, 0.25),
    "rows only": (replace(BASE, train_columns=False), 5, None),
    "columns only": (replace(BASE, train_rows=False), 5, None),
    "no biases": (replace(BASE, train_biases=False), 5, None),
    "contrastive scores (same budget)": (BASE, 5, "contrastive"),
    "all token positions in L_f": (_rmisu(skip_shared_prefix=False), 5, None),
    "per-request targets": (_rmisu(target_per="request"), 5, None),
    "per-input targets": (_rmisu(target_per="input"), 5, None),
    "per-request paths": (replace(BASE, per_request=True), 5, None),
    "per-request paths and targets": (replace(BASE, per_request=True, rmisu=replace(BASE.rmisu, target_per="request")),
                                      5, None),
}


def quiet(_: str) -> None:
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--forget", type=int, default=5)
    ap.add_argument("--subsets", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", help="run only these variations")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench0 = load_benchmark(args.bench)
    loaded = load_model(args.model)
    model, adapter, processor = loaded.model, loaded.adapter, loaded.processor
    vanilla = copy.deepcopy(model.state_dict())
    results = []
    for subset in args.subsets:
        bench = bench0.with_forget_seed(subset)
        forget = bench.split_items("forget", forget_pct=args.forget)
        retain = bench.split_items("retain", forget_pct=args.forget)
        data = unlearn_data(processor, bench, forget, retain)
        model.load_state_dict(vanilla)
        ref = {(r.split, r.modality, r.task): r.value
               for r in evaluate(model, processor, bench, forget_pct=args.forget, splits=("forget", "retain"))}
        print(f"subset {subset} vanilla " + " ".join(f"{k[0]}/{k[1]}/{k[2]}={v:.3f}" for k, v in sorted(ref.items())),
              flush=True)
        graphs, retain_paths, dense = {}, None, None
        for name, (cfg, top_k, ratio) in VARIATIONS.items():
            if args.only and name not in args.only:
                continue
            if top_k not in graphs:
                paths, _ = attribute_items(model, adapter, processor, bench, forget, AttributionConfig(top_k=top_k),
                                           request_ids={it.item_id: request_of(it) for it in forget})
                graphs[top_k] = paths
            paths = graphs[top_k]
            if ratio is None or ratio == "contrastive":
                graph = reduce_paths(paths, run_id="variation")
            else:
                if retain_paths is None:
                    retain_paths, _ = attribute_items(model, adapter, processor, bench, retain,
                                                      AttributionConfig(top_k=top_k))
                graph = reduce_paths(paths, run_id="variation", retain_paths=retain_paths,
                                     retain_filter=RetainFilter(ratio))
            if ratio == "contrastive":
                if dense is None:
                    dense = {kind: {site: scores for tower in ("language", "vision")
                                    for site, scores in dense_scores(
                                        model, adapter, [ex for ex, it in zip(exs, items, strict=True)
                                                         if tower_for(it) == tower],
                                        tower, AttributionConfig(top_k=top_k), data.pad_token_id).items()}
                             for kind, exs, items in (("forget", data.forget, forget),
                                                      ("retain", data.retain, retain))}
                union = from_graph(adapter, graph)
                sel = contrastive_selection(dense["forget"], dense["retain"], {s: len(v) for s, v in union.items()})
                arms = {"mip": partial(path_edit, model, adapter, data, sel, cfg, method="mip", log=quiet),
                        "random": partial(path_edit, model, adapter, data, random_like(adapter, sel, seed=subset),
                                          cfg, method="random", log=quiet)}
            else:
                arms = {arm: partial(m.run, model, adapter, data, graph=graph, log=quiet)
                        for arm, m in (("mip", MipEditor(config=cfg)), ("random", RandomControl(config=cfg, seed=subset)))}
            for arm, run_arm in arms.items():
                model.load_state_dict(vanilla)
                t0 = time.perf_counter()
                summary = run_arm()
                seconds = time.perf_counter() - t0
                rows = evaluate(model, processor, bench, forget_pct=args.forget, splits=("forget", "retain"))
                v = {(r.split, r.modality, r.task): r.value for r in rows}
                rec = {"variation": name, "arm": arm, "subset": subset, "neurons": summary.details["neurons"],
                       "layer": summary.details["layer"], "seconds": round(seconds, 1)}
                for m in ("multimodal", "text"):
                    f, r = v[("forget", m, "mc")], v[("retain", m, "mc")]
                    vf, vr = ref[("forget", m, "mc")], ref[("retain", m, "mc")]
                    rec[m] = {"forget": f, "retain": r, "forget_rouge": v[("forget", m, "gen")],
                              "retain_rouge": v[("retain", m, "gen")],
                              "forgetting": forgetting_rate(vf, f), "retention": retention(vr, r),
                              "hm": harmonic_mean(forgetting_rate(vf, f), retention(vr, r))}
                results.append(rec)
                with open(args.out, "w") as f:  # after every run: a long sweep can be read (or cut) midway
                    json.dump({"forget_pct": args.forget, "defaults": BASE.to_dict(), "results": results}, f, indent=1)
                print(f"subset {subset} {name:32s} {arm:6s} n={rec['neurons']:4d} "
                      + " ".join(f"{m[:4]} f={rec[m]['forget']:.3f} r={rec[m]['retain']:.3f} hm={rec[m]['hm']:.3f}"
                                 for m in ("multimodal", "text")), flush=True)
    with open(args.out, "w") as f:
        json.dump({"forget_pct": args.forget, "defaults": BASE.to_dict(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
