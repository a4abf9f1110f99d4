"""Markdown tables for BENCHMARKS.md from `mip compare --json` files: per modality, mean +- std over subsets.

    python benches/compare_table.py benches/results/compare05.json [more.json ...]
"""

from __future__ import annotations

import json
import sys

from mip_core.compare import CompareRow, SummaryRow, paired_differences

COLUMNS = (("forget acc", "forget", "mc", "accuracy"), ("retain acc", "retain", "mc", "accuracy"),
           ("test acc", "test", "mc", "accuracy"), ("utility acc", "utility", "mc", "accuracy"),
           ("forget ROUGE", "forget", "gen", "rougeL"), ("retain ROUGE", "retain", "gen", "rougeL"),
           ("forgetting", "forget", "mc", "forgetting_rate"), ("retention", "retain", "mc", "retention"),
           ("utility ret.", "utility", "mc", "retention"), ("MIA AUC", "forget", "mia", "mia_auc"),
           ("**HM**", "overall", "mc", "hm"))


def table(doc: dict) -> str:
    summary = [SummaryRow(**s) for s in doc["summary"]]
    idx = {(s.method, s.split, s.modality, s.task, s.metric): s for s in summary}
    methods = list(dict.fromkeys(s.method for s in summary))
    seeds = max(s.n_seeds for s in summary)
    out = []
    for modality in ("multimodal", "text"):
        out.append(f"**{modality}** ({doc['config']['forget_pct']} % forget, "
                   f"{'mean +- std over ' + str(seeds) + ' forget subsets' if seeds > 1 else 'one forget subset'})\n")
        out.append("| method | " + " | ".join(c[0] for c in COLUMNS) + " |")
        out.append("|---" * (len(COLUMNS) + 1) + "|")
        for m in methods:
            cells = []
            for _, split, task, metric in COLUMNS:
                s = idx.get((m, split, modality, task, metric))
                cells.append("-" if s is None else (f"{s.mean:.3f} +- {s.std:.3f}" if seeds > 1 else f"{s.mean:.3f}"))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    rows = [CompareRow(**r) for r in doc["rows"]]
    for other in ("random", "rmu"):
        diffs = paired_differences(rows, "mip", other)
        out.append(f"HM(mip) - HM({other}) per subset: " + "; ".join(
            f"{m} {', '.join(f'{d:+.3f}' for d in v)}" for m, v in diffs.items()))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(f"### {path}\n")
            print(table(json.load(f)))
