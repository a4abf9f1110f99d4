"""Wall time of one service batch and its split per step, for 1, 4 and 16 requests with 1 and 2 Ray actors.

Each configuration starts from a fresh local store: the model is registered, N one-person requests are queued and
the nightly flow runs in this process (ephemeral Prefect, local Ray, the edit as a 2-rank DeepSpeed job). Results
go to a JSON file row by row (a crash keeps what was measured) and a markdown table is printed at the end.

    python benches/service_bench.py --model demo_out/vanilla --bench demo_out/bench --out benches/results/service.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

STEPS = ("plan", "attribute", "reduce", "edit", "evaluate", "publish")


def run_one(model: str, bench: str, root: Path, n_requests: int, n_actors: int, ranks: int,
            launcher: str = "deepspeed") -> dict:
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from mip_core.benchmark import load_benchmark
    from mip_core.service.requests import ForgetRequest
    from mip_core.service.store import ServiceStore

    shutil.rmtree(root, ignore_errors=True)
    store = ServiceStore(str(root))
    store.register_model("bench", model, dataset_uri=bench)
    people = [p.profile_id for p in load_benchmark(bench).profiles][:n_requests]
    for k, person in enumerate(people):
        store.submit(ForgetRequest(request_id=f"bench-{k:03d}", target_model="bench", subjects=[person],
                                   requester="bench", reason="other"))
    t0 = time.perf_counter()
    spec = ServiceSpec(root=str(root), n_actors=n_actors, ranks=ranks, launcher=launcher,
                       split_held_back=False)  # one batch's wall time, not the night's retries
    [result] = nightly_unlearning(spec)
    wall = time.perf_counter() - t0
    m = json.loads((root / "batches" / result["batch_id"] / "manifest.json").read_text())
    gate = json.loads((root / "batches" / result["batch_id"] / "gate.json").read_text())
    return {"requests": n_requests, "actors": n_actors, "ranks": ranks, "launcher": launcher,
            "items": len(m["forget"]), "wall_s": round(wall, 1), "steps_s": result["timings"],
            "published": result["version"],
            "gate_passed": gate["passed"], "gate_reasons": gate["reasons"],
            "relative": {f"{s['items']}/{s['modality']}": round(s["relative"], 3) for s in gate["scores"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--out", default="benches/results/service.json")
    ap.add_argument("--requests", default="1,4,16")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun", "inprocess"))
    ap.add_argument("--work", default="demo_out/service_bench")
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out file")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benches/service_bench.py " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "threads": os.environ.get("MIP_THREADS", "1"), "rows": []}
    if args.append and out.exists():
        meta["rows"] = json.loads(out.read_text())["rows"]
    for n_actors in map(int, args.actors.split(",")):
        for n in map(int, args.requests.split(",")):
            row = run_one(args.model, args.bench, Path(args.work) / f"r{n}a{n_actors}", n, n_actors, args.ranks,
                          args.launcher)
            meta["rows"].append(row)
            out.write_text(json.dumps(meta, indent=1) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| requests | items | actors | wall s | " + " | ".join(STEPS) + " |")
    print("|---|---|---|---|" + "---|" * len(STEPS))
    for r in meta["rows"]:
        print(f"| {r['requests']} | {r['items']} | {r['actors']} | {r['wall_s']} | "
              + " | ".join(str(r["steps_s"].get(s, "-")) for s in STEPS) + " |")


if __name__ == "__main__":
    main()
