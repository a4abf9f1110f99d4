"""Recover per-run HM rows from `mip compare` logs (the headline line each evaluation prints).

The selectivity runs of BENCHMARKS.md section 5 crashed after their last evaluation, in the paired summary printed
before the JSON was written (a bug fixed since: the JSON is now written first). Every evaluation's headline line
(forget / retain MC accuracy and HM per modality) survives in the log; this turns them into the JSON that
`benches/selectivity_table.py` reads (`rows` with ``overall/hm`` plus forget/retain accuracy, and a summary).

    python benches/selectivity_from_logs.py LOG OUT.json
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict

from mip_core.compare import CompareRow, summarize
from mip_core.evaluation import forgetting_rate, retention

LINE = re.compile(r"^\s+(\w+)\s+evaluated in \d+s\s+mult: forget ([\d.]+) retain ([\d.]+)(?: hm ([\d.]+))? \| "
                  r"text: forget ([\d.]+) retain ([\d.]+)(?: hm ([\d.]+))?")


def parse(path: str) -> list[CompareRow]:
    rows, seed, vanilla = [], -1, {}
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("seed "):
            seed = int(line.split()[1].rstrip(":"))
        m = LINE.match(line)
        if not m:
            continue
        method, mf, mr, mh, tf, tr, th = m.groups()
        for modality, f, r, h in (("multimodal", mf, mr, mh), ("text", tf, tr, th)):
            rows.append(CompareRow(method, seed, "forget", modality, "mc", "accuracy", float(f), 0))
            rows.append(CompareRow(method, seed, "retain", modality, "mc", "accuracy", float(r), 0))
            if method == "vanilla":
                vanilla[(seed, modality)] = (float(f), float(r))
            elif h is not None:  # rates against this subset's vanilla row, as `mip compare` computes them
                vf, vr = vanilla[(seed, modality)]
                rows.append(CompareRow(method, seed, "forget", modality, "mc", "forgetting_rate",
                                       forgetting_rate(vf, float(f)), 0))
                rows.append(CompareRow(method, seed, "retain", modality, "mc", "retention", retention(vr, float(r)), 0))
                rows.append(CompareRow(method, seed, "overall", modality, "mc", "hm", float(h), 0))
    return rows


if __name__ == "__main__":
    rows = parse(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump({"schema": "mip-compare/1", "source": sys.argv[1], "rows": [r.to_dict() for r in rows],
                   "summary": [asdict(s) for s in summarize(rows)]}, f, indent=1)
