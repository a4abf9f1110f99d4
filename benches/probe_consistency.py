"""How well self-consistency tells a person the model knows from an invented name (BENCHMARKS.md section 8).

For every person of the benchmark (the model was trained on them) and for invented names (unused combinations of
the benchmark's own first and last names, the hardest case, plus five names from outside its pools), the service's
text probes are built from the registered templates, answered by the model, and selected (``select_probes``).
The figure per name is the share of facts whose edit phrasings agree; the table shows, per threshold, how many
trained people would be refused and how many invented names accepted.

    python benches/probe_consistency.py --model demo_out/vanilla --bench demo_out/bench
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
from pathlib import Path

THRESHOLDS = (0.2, 0.4, 0.5, 0.6)
OUTSIDE = ("Jane Doe", "Zed Quorum", "Maria Schmidt", "John Smith", "Aiko Tanaka")


def consistent_share(model, processor, bench, templates, name: str) -> float:
    from mip_core.evaluation.runner import probe_answers
    from mip_core.service.probes import build_candidates, consistent_shares, select_probes
    from mip_core.service.requests import ForgetRequest, Person

    req = ForgetRequest(request_id="r", target_model="m", subjects=[Person(name=name)], requester="bench",
                        reason="other")
    probes, _ = build_candidates(req, 0, req.subjects[0], [], templates)
    answers = dict(zip((p.probe_id for p in probes),
                       probe_answers(model, processor, bench, [p.item() for p in probes]), strict=True))
    [(same, asked)] = consistent_shares(select_probes(probes, answers)).values()  # text templates only
    return same / asked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--invented", type=int, default=50)
    ap.add_argument("--out", default="benches/results/probe_consistency.json")
    args = ap.parse_args()
    from mip_core.benchmark import load_benchmark
    from mip_core.benchmark.content import FIRST_NAMES, LAST_NAMES
    from mip_core.modeling import load_model
    from mip_core.service.keepsets import benchmark_templates

    bench = load_benchmark(args.bench)
    loaded = load_model(args.model, device="cpu")
    templates = [t for t in benchmark_templates() if t.modality == "text" and t.use == "edit"]
    known = [p.name for p in bench.profiles]
    unused = [f"{f} {last}" for f, last in itertools.product(FIRST_NAMES, LAST_NAMES) if f"{f} {last}" not in known]
    invented = random.Random(0).sample(unused, args.invented) + list(OUTSIDE)
    shares = {kind: [consistent_share(loaded.model, loaded.processor, bench, templates, n) for n in names]
              for kind, names in (("trained", known), ("invented", invented))}
    rows = [{"threshold": t, "trained_refused": sum(s < t for s in shares["trained"]),
             "invented_accepted": sum(s >= t for s in shares["invented"])} for t in THRESHOLDS]
    outside = shares["invented"][-len(OUTSIDE):]
    result = {"command": "python benches/probe_consistency.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "n_trained": len(known), "n_invented": len(invented),
              "mean_share": {k: round(statistics.mean(v), 3) for k, v in shares.items()},
              "outside_pool_shares": dict(zip(OUTSIDE, outside, strict=True)), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
