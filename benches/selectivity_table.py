"""The selectivity answer for BENCHMARKS.md: paths vs random neurons vs full-model RMisU, at each model scale.

Reads one `mip compare --json` file per scale (same methods, same forget subsets) and prints two markdown tables:
selectivity (HM of MC forgetting rate and MC retention) and its parts per method and scale, then the paired
differences HM(mip) - HM(other) per subset with the verdict of :class:`mip_core.compare.PairedComparison`.

    python benches/selectivity_table.py demo=benches/results/selectivity_demo.json \
        scale2=benches/results/selectivity_scale2.json
"""

from __future__ import annotations

import json
import sys

from mip_core.compare import CompareRow, SummaryRow, paired_comparison

PARTS = (("forgetting", "forget", "forgetting_rate"), ("retention", "retain", "retention"),
         ("utility ret.", "utility", "retention"), ("**HM**", "overall", "hm"))


def load(arg: str) -> tuple[str, dict]:
    label, _, path = arg.partition("=")
    with open(path or label) as f:
        return (label if path else path), json.load(f)


def main(args: list[str]) -> str:
    docs = [load(a) for a in args]
    out = ["| scale | method | " + " | ".join(f"{p[0]} (mm / text)" for p in PARTS) + " |",
           "|---|---|" + "---|" * len(PARTS)]
    for label, doc in docs:
        idx = {(s.method, s.split, s.modality, s.metric): s for s in (SummaryRow(**d) for d in doc["summary"])
               if s.task == "mc"}
        for method in [m for m in dict.fromkeys(s["method"] for s in doc["summary"]) if m != "vanilla"]:
            cells = []
            for _, split, metric in PARTS:
                pair = [idx.get((method, split, m, metric)) for m in ("multimodal", "text")]
                cells.append(" / ".join("-" if s is None else f"{s.mean:.3f} +- {s.std:.3f}" for s in pair))
            out.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    out += ["", "| scale | HM(mip) - HM(...) | modality | per subset | mean | spread | ahead on | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for label, doc in docs:
        rows = [CompareRow(**r) for r in doc["rows"]]
        methods = [m for m in dict.fromkeys(r.method for r in rows) if m not in ("vanilla", "mip")]
        for other in methods:
            for c in paired_comparison(rows, "mip", other):
                verdict = ("**ahead beyond the spread**" if c.beyond_spread
                           else "ahead, within the spread" if c.mean > 0 else "not ahead")
                out.append(f"| {label} | {other} | {c.modality} | {', '.join(f'{d:+.3f}' for d in c.diffs)} | "
                           f"{c.mean:+.3f} | {c.spread:.3f} | {c.wins}/{len(c.diffs)} | {verdict} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
