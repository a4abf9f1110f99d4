"""What a forgotten person's answers turn into, by RMisU target scale and plausibility weight (BENCHMARKS.md
section 9, "How far to push").

The loss-based membership attack compares how likely the model finds the forget items' answers with how likely it
finds never-seen people's. A model that never saw the people (the gold model) answers them like strangers: a
plausible value of the right kind, the right one about as likely as any other option. This script edits the
vanilla model of the gold benchmark on forget subset 0 with the ``mip`` edit at each ``--edits`` setting
(``target_scale:plausible_weight``, the rest default), and reports per modality the median mean-token
log-probability of the right answer and of the wrong options, for the forget items and for never-seen people, the
membership AUC, and a few greedy answers side by side.

    python benches/forget_familiarity.py --model demo_out/gold_bench/vanilla --bench demo_out/gold_bench/bench \
        --gold demo_out/gold_bench/gold0 --edits 5:0 2:0 2:1 --out benches/results/forget_familiarity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
from pathlib import Path

MODALITIES = ("multimodal", "text")
SHOWN = 4  # greedy answers shown per modality


def option_levels(model, processor, bench, items, answer_levels) -> tuple[float, float]:
    """Median mean-token log-probability of the right option and of the wrong ones, over ``items``' options.

    The right option is the item's answer (``Item`` checks it), so its level is ``answer_levels``' (one per item,
    in order); the wrong options are scored in one batched pass."""
    from mip_core.evaluation.runner import answer_mean_logprobs

    with_options = [(it, level) for it, level in zip(items, answer_levels, strict=True) if it.options]
    wrong = [(it, opt) for it, _ in with_options for k, opt in enumerate(it.options) if k != it.answer_index]
    wrong_levels = answer_mean_logprobs(model, processor, bench, [it for it, _ in wrong], [o for _, o in wrong])
    return statistics.median(level for _, level in with_options), statistics.median(wrong_levels)


def familiarity(loaded, bench, forget, holdout_bench, holdout) -> dict[str, dict]:
    """Per modality: the answer levels of forget and never-seen items, the membership AUC, greedy answers."""
    from mip_core.evaluation.mia import auc
    from mip_core.evaluation.runner import answer_mean_logprobs, generate_answers

    model, processor = loaded.model, loaded.processor
    out = {}
    for m in MODALITIES:
        f = [it for it in forget if it.modality == m]
        h = [it for it in holdout if it.modality == m]
        f_levels = answer_mean_logprobs(model, processor, bench, f)
        h_levels = answer_mean_logprobs(model, processor, holdout_bench, h)
        (f_right, f_wrong), (h_right, h_wrong) = (option_levels(model, processor, bench, f, f_levels),
                                                  option_levels(model, processor, holdout_bench, h, h_levels))
        out[m] = {"mia_auc": round(auc(f_levels, h_levels), 3),
                  "forget_right": round(f_right, 2), "forget_wrong": round(f_wrong, 2),
                  "never_seen_right": round(h_right, 2), "never_seen_wrong": round(h_wrong, 2),
                  "forget_said": [[it.answer, said] for it, said in
                                  zip(f[:SHOWN], generate_answers(model, processor, bench, f[:SHOWN]))],
                  "never_seen_said": [[it.answer, said] for it, said in
                                      zip(h[:SHOWN], generate_answers(model, processor, holdout_bench, h[:SHOWN]))]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the vanilla model of the gold benchmark")
    ap.add_argument("--bench", required=True)
    ap.add_argument("--gold", required=True, help="the gold model of forget subset 0 (mip vanilla --exclude-forget)")
    ap.add_argument("--forget", type=int, default=10, help="forget percentage (default 10, as bench-gold)")
    ap.add_argument("--edits", nargs="+", default=["5:0", "2:0", "2:1"],
                    help="RMisU settings to compare, each target_scale:plausible_weight")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from mip_core.benchmark.dataset import load_benchmark
    from mip_core.benchmark.holdout import holdout_items
    from mip_core.editing.data import unlearn_data
    from mip_core.editing.methods import get_method
    from mip_core.editing.unlearn import forget_graph
    from mip_core.modeling.io import cache_dir, load_model

    bench = load_benchmark(args.bench).with_forget_seed(0)
    forget = bench.split_items("forget", forget_pct=args.forget)
    retain = bench.split_items("retain", forget_pct=args.forget)
    holdout_bench, holdout = holdout_items(bench, 10, cache_dir())
    rows = {"gold": familiarity(load_model(args.gold), bench, forget, holdout_bench, holdout)}
    loaded = load_model(args.model)
    rows["vanilla"] = familiarity(loaded, bench, forget, holdout_bench, holdout)
    vanilla = copy.deepcopy(loaded.model.state_dict())
    data = unlearn_data(loaded.processor, bench, forget, retain)
    graph = forget_graph(loaded, bench, forget_pct=args.forget, run_id="familiarity")
    for setting in args.edits:
        scale, weight = (float(x) for x in setting.split(":"))
        loaded.model.load_state_dict(vanilla)
        method = get_method("mip", edit_overrides={"rmisu": {"target_scale": scale, "plausible_weight": weight}},
                            seed=0)
        method.run(loaded.model, loaded.adapter, data, graph=graph, log=lambda _line: None)
        name = f"mip, target_scale {scale:g}, plausible_weight {weight:g}"
        rows[name] = familiarity(loaded, bench, forget, holdout_bench, holdout)
        print(name + ": " + json.dumps({m: rows[name][m]["mia_auc"] for m in MODALITIES}), flush=True)
    result = {"schema": "forget_familiarity/1", "model": args.model, "bench": args.bench, "gold": args.gold,
              "forget_pct": args.forget, "forget_seed": 0, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: {m: {x: v[m][x] for x in ("mia_auc", "forget_right", "forget_wrong", "never_seen_right",
                                                    "never_seen_wrong")} for m in MODALITIES}
                      for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
