"""A markdown table from `benches/editing_variations.py` results: per variation, mean over the subsets it ran on.

    python benches/variations_table.py benches/results/selectivity_variations_demo.json [more.json ...]

Columns, multimodal / text: HM of the path edit, HM of the random control at the same budget, and the paired
difference HM(path) - HM(random) with the number of subsets where it is positive.
"""

from __future__ import annotations

import json
import statistics
import sys

MODALITIES = ("multimodal", "text")


def table(paths: list[str]) -> str:
    runs: dict[tuple[str, int], dict[str, dict]] = {}  # (variation, subset) -> arm -> record
    for path in paths:
        with open(path) as f:
            for rec in json.load(f)["results"]:
                runs.setdefault((rec["variation"], rec["subset"]), {})[rec["arm"]] = rec
    variations = list(dict.fromkeys(v for v, _ in runs))
    header = ("| variation | subsets | neurons | forgetting, path (mm / text) | retention, path | HM, path "
              "| HM, random | HM(path) - HM(random), mean (ahead on) |")
    out = [header, "|---|---|---|---|---|---|---|---|"]
    for name in variations:
        pairs = [arms for (v, _), arms in runs.items() if v == name and {"mip", "random"} <= set(arms)]
        if not pairs:
            continue
        subsets = sorted(arms["mip"]["subset"] for arms in pairs)

        def mean(get, pairs=pairs) -> str:
            return " / ".join(f"{statistics.fmean(get(a, m) for a in pairs):.3f}" for m in MODALITIES)

        diffs = {m: [a["mip"][m]["hm"] - a["random"][m]["hm"] for a in pairs] for m in MODALITIES}
        neurons = sorted({a["mip"]["neurons"] for a in pairs})
        out.append(
            f"| {name} | {', '.join(map(str, subsets))} | {neurons[0]}-{neurons[-1]} | "
            f"{mean(lambda a, m: a['mip'][m].get('forgetting', 1 - a['mip'][m]['forget']))} | "
            f"{mean(lambda a, m: a['mip'][m].get('retention', a['mip'][m]['retain']))} | "
            f"{mean(lambda a, m: a['mip'][m]['hm'])} | {mean(lambda a, m: a['random'][m]['hm'])} | "
            + " / ".join(f"{statistics.fmean(d):+.3f} ({sum(x > 0 for x in d)}/{len(d)})" for d in diffs.values())
            + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
