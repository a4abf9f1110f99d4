"""Probe-built requests against benchmark-id requests on the same people (BENCHMARKS.md section 8).

Two fresh stores, the same model, the same people, the same service settings:

- ``benchmark_ids``: the model registered with its training benchmark (``--dataset``), one request per person
  naming the profile id; the batch edits the person's benchmark items (the way the service worked before).
- ``probes``: the model registered with plain keep-set files exported from that benchmark (``--retain``,
  ``--utility``, ``--templates``), one request per person naming them by name and photo only; the service builds
  its own probes and the batch never opens the benchmark (``MIP_NO_BENCHMARK=1`` while it runs).

Each batch's edited model (``batches/<id>/edited``, whether or not the gate published it) is then scored here, on
the benchmark, by multiple choice: the people's training questions (forget), their held-out paraphrases and
transformed photos (test), everyone else's questions (retain) and the general questions (utility), against the
same items on the starting model. Rows go to ``--out`` as they are measured.

    python benches/probe_bench.py --model demo_out/vanilla --bench demo_out/bench --people 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

SETS = ("forget", "test", "retain", "utility")


def _requests(kind: str, bench, people: list[str], photo_dir: Path) -> list[dict]:
    out = []
    for k, pid in enumerate(people):
        if kind == "benchmark_ids":
            subject = pid
        else:
            profile = bench.profile(pid)
            photo = photo_dir / f"{pid}.png"
            photo.write_bytes((Path(bench.root) / profile.image).read_bytes())
            subject = {"name": profile.name, "photos": [str(photo)]}
        out.append({"request_id": f"cmp-{k:03d}", "target_model": "demo", "subjects": [subject],
                    "requester": "bench", "reason": "privacy"})
    return out


def run_batch(kind: str, model: str, bench_dir: str, people: list[str], work: Path, spec_args: dict) -> dict:
    """Register, submit, run the nightly flow; returns the batch's id, verdicts and timings."""
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from mip_core.benchmark import load_benchmark
    from mip_core.service.requests import ForgetRequest
    from mip_core.service.store import ServiceStore
    from nightly_bench import register_demo  # benches/ is this script's path

    root = work / kind
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    bench = load_benchmark(bench_dir)
    store_root = str(root / "store")
    register_demo(store_root, model, bench_dir, root, by_name=kind != "benchmark_ids")
    store = ServiceStore(store_root)
    for req in _requests(kind, bench, people, root):
        store.submit(ForgetRequest(**req))
    if kind == "probes":
        os.environ["MIP_NO_BENCHMARK"] = "1"  # the batch must not open the benchmark
    t0 = time.perf_counter()
    try:
        # by default the one batch both ways of asking are compared on, not the smaller batches a held-back one
        # becomes (--spec '{"split_held_back": true}' runs the whole night; the row is its first batch)
        [result, *retried] = nightly_unlearning(ServiceSpec(root=store_root,
                                                            **{"split_held_back": False, **spec_args}))
    finally:
        os.environ.pop("MIP_NO_BENCHMARK", None)
        import ray

        ray.shutdown()  # the next kind's actors must not inherit this one's environment
    batch = Path(store_root) / "batches" / result["batch_id"]
    gate = json.loads((batch / "gate.json").read_text())
    records = {r.request.request_id: r.state for r in store.list()}
    return {"kind": kind, "batch_id": result["batch_id"], "edited": str(batch / "edited"), "store": store_root,
            "wall_s": round(time.perf_counter() - t0, 1), "published": result["version"],
            "requests_done": sum(s == "done" for s in records.values()), "states": records,
            "gate_passed": gate["passed"], "gate_reasons": gate["reasons"],
            "per_request": gate["per_request"], "timings": result["timings"],
            "night": [{"batch_id": r["batch_id"], "version": r["version"], "retry": r["retry"],
                       "requests": json.loads((Path(store_root) / "batches" / r["batch_id"] / "claim.json")
                                              .read_text())["requests"],
                       "wall_s": round(sum(r["timings"].values()), 1)} for r in [result, *retried]],
            "held_back_in": {r.request.request_id: r.held_back_in for r in store.list()},
            "versions": {r.request.request_id: r.model_version for r in store.list()}}


def score(model_dir: str, bench, people: set[str]) -> dict[str, float]:
    """Multiple-choice accuracy of a model on the four benchmark sets relative to ``people``."""
    from mip_core.evaluation.runner import multiple_choice
    from mip_core.modeling import load_model

    loaded = load_model(model_dir, device="cpu")
    sets = {"forget": [it for it in bench.items if it.kind == "qa" and it.profile_id in people],
            "test": [it for it in bench.items if it.kind == "test" and it.profile_id in people],
            "retain": [it for it in bench.items if it.kind == "qa" and it.profile_id not in people],
            "utility": [it for it in bench.items if it.kind == "utility"]}
    return {name: sum(multiple_choice(loaded.model, loaded.processor, bench, items)) / len(items)
            for name, items in sets.items()}


def relapse(row: dict, bench, people: list[str]) -> list[dict]:
    """For each version the night published: its people's accuracy on it and on every later version of the night
    (does a later edit bring earlier-forgotten people back?). Request ``cmp-K`` names ``people[K]``."""
    order = [n["version"] for n in row["night"] if n["version"]]
    forgotten_by = {v: [people[int(rid.split("-")[1])] for rid, got in row["versions"].items() if got == v]
                    for v in order}
    out = []
    for i, version in enumerate(order):
        for later in order[i:]:
            acc = score(str(Path(row["store"]) / "models" / "demo" / later), bench, set(forgotten_by[version]))
            out.append({"forgotten_by": version, "people": forgotten_by[version], "scored_on": later,
                        "forget": round(acc["forget"], 3), "test": round(acc["test"], 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--people", type=int, default=5, help="the first N people of the benchmark's forget05 split")
    ap.add_argument("--out", default="benches/results/probes.json")
    ap.add_argument("--work", default="demo_out/probe_bench")
    ap.add_argument("--kinds", default="benchmark_ids,probes")
    ap.add_argument("--append", action="store_true", help="replace only --kinds' rows of an existing --out file")
    ap.add_argument("--spec", default="{}", help='ServiceSpec overrides as JSON, e.g. \'{"retain_limit": 240}\'')
    args = ap.parse_args()
    from mip_core.benchmark import load_benchmark

    bench = load_benchmark(args.bench)
    people = sorted(bench.forget_profile_ids(5))[: args.people]
    meta = {"command": "python benches/probe_bench.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "people": people, "vanilla": score(args.model, bench, set(people)), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kinds = args.kinds.split(",")
    if args.append and out.exists():  # keep the other kinds' rows of an earlier run on the same people
        earlier = json.loads(out.read_text())
        meta["rows"] = [r for r in earlier["rows"] if r["kind"] not in kinds and earlier["people"] == people]
    for kind in kinds:
        row = run_batch(kind, args.model, args.bench, people, Path(args.work), json.loads(args.spec))
        row["spec"] = json.loads(args.spec)
        row["accuracy"] = score(row["edited"], bench, set(people))
        v = meta["vanilla"]
        row["forgetting"] = {s: round(1 - row["accuracy"][s] / v[s], 3) for s in ("forget", "test")}
        row["retention"] = {s: round(row["accuracy"][s] / v[s], 3) for s in ("retain", "utility")}
        published = [n["version"] for n in row["night"] if n["version"]]
        if len(row["night"]) > 1 and published:  # a night of several batches: also its last version, scored
            acc = score(str(Path(row["store"]) / "models" / "demo" / published[-1]), bench, set(people))
            row["last_version"] = {"version": published[-1], "accuracy": acc,
                                   "forgetting": {s: round(1 - acc[s] / v[s], 3) for s in ("forget", "test")},
                                   "retention": {s: round(acc[s] / v[s], 3) for s in ("retain", "utility")}}
        if len(published) > 1:
            row["relapse"] = relapse(row, bench, people)
            print(json.dumps(row["relapse"]), flush=True)
        meta["rows"].append(row)
        out.write_text(json.dumps(meta, indent=1) + "\n")
        print(json.dumps({k: row[k] for k in ("kind", "published", "requests_done", "forgetting", "retention",
                                              "wall_s")}), flush=True)
    print("\n| requests | published | done | forgetting (train qs) | forgetting (held-out) | retention | utility |"
          " wall s |\n|---|---|---|---|---|---|---|---|")
    for r in meta["rows"]:
        print(f"| {r['kind']} | {r['published'] or 'no'} | {r['requests_done']}/{len(people)} | "
              f"{r['forgetting']['forget']:.3f} | {r['forgetting']['test']:.3f} | {r['retention']['retain']:.3f} | "
              f"{r['retention']['utility']:.3f} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
