"""Nights of forget requests through the service, measured against a model trained without those people
(BENCHMARKS.md section 10; ``make bench-nightly``).

Each scenario is a fresh store with the demo model registered with its benchmark, and nights of one-person
requests naming benchmark profile ids (the people of forget subset ``--people-seed``, in its order, so every
scenario's people are a prefix of the same list). A night submits its requests and runs the
``nightly-unlearning`` flow in-process (Prefect ephemeral server, local Ray) with the service's defaults plus the
scenario's settings:

- ``night16``, ``night32``: one night, the default batching (``requests_per_batch``, splits of held-back batches);
- ``one_batch16``, ``one_batch32``: the same work as one batch, not split (``requests_per_batch: null``,
  ``split_held_back: false``): what the scheduling changes;
- ``random16``: ``night16`` editing random neurons instead of paths (the same counts): what the method changes;
- ``five_nights``: five consecutive nights of 4 requests on one store (the lineage grows);
- ``names16``: ``night16`` with each request giving only the person's name and photo, the model registered with
  the plain keep-set files ``mip benchmark export`` writes, and the batches kept off the benchmark
  (``MIP_NO_BENCHMARK=1``): the service builds its own probes, as for a real client's request;
- ``smoke``: two nights of one request and a short edit, to check the bench runs.

Rows (``--out``): one per batch the service ran (``batch`` >= 0: the gate's own figures, on its samples), and one
per night (``batch: "night"``), measured here on the whole benchmark on the version current after the night, by
multiple choice: forget accuracy of tonight's people and of earlier nights' people (and how much the latter rose
since their own night), the gold model's on the same people, retention on people never requested (outside the
whole list) and utility relative to the vanilla model, ROUGE-L of greedy answers on those kept sets against the
vanilla model's answers, and the privacy leak ``(AUC - AUC_gold) / AUC_gold`` of the loss-based membership attack
(forget items against never-seen people).

    python benches/nightly_bench.py --model demo_out/vanilla --bench demo_out/bench --gold demo_out/nightly_gold
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any

SCENARIOS: dict[str, dict[str, Any]] = {
    "night16": {"nights": [16], "spec": {}},
    "night32": {"nights": [32], "spec": {}},
    "one_batch16": {"nights": [16], "spec": {"requests_per_batch": None, "split_held_back": False}},
    "one_batch32": {"nights": [32], "spec": {"requests_per_batch": None, "split_held_back": False}},
    "random16": {"nights": [16], "spec": {"method": "random"}},
    "five_nights": {"nights": [4] * 5, "spec": {}},
    "names16": {"nights": [16], "spec": {}, "by_name": True},
    # checks the bench runs (minutes): a short fixed edit strong enough to publish, so night 2 has an earlier person
    "smoke": {"nights": [1, 1], "spec": {"edit": {"rmisu": {"steps": 60, "lr": 0.03}}}},
}
DEFAULT_SCENARIOS = "five_nights,night32,one_batch32,one_batch16,night16,random16"
BASE_SPEC = {"n_actors": 2, "launcher": "inprocess"}
ROUGE_RETAIN_SAMPLE = 200  # retain items generated per model (utility: all); MC scores every item


class Measure:
    """Per-item figures of one model on the benchmark sets the rows need, so any group of people is a sum."""

    def __init__(self, model_uri: str, sets: dict[str, list], holdout: tuple[Any, list], bench: Any,
                 vanilla_answers: dict[str, str] | None = None) -> None:
        from mip_core.evaluation.metrics import rouge_l
        from mip_core.evaluation.mia import mean_answer_logprob
        from mip_core.evaluation.runner import generate_answers, multiple_choice
        from mip_core.modeling import load_model
        from mip_core.training import encode_items

        loaded = load_model(model_uri, device="cpu")
        model, processor, pad = loaded.model, loaded.processor, int(loaded.processor.tokenizer.pad_token_id)
        model.eval()
        every = sets["people"] + sets["retain"] + sets["utility"]
        self.correct = dict(zip([it.item_id for it in every], multiple_choice(model, processor, bench, every),
                                strict=True))
        self.member = dict(zip([it.item_id for it in sets["people"]],
                               mean_answer_logprob(model, encode_items(processor, bench, sets["people"]), pad),
                               strict=True))
        hbench, hitems = holdout
        self.non_member = mean_answer_logprob(model, encode_items(processor, hbench, hitems), pad)
        gen_items = sets["retain_gen"] + sets["utility"]
        self.answers = dict(zip([it.item_id for it in gen_items],
                                generate_answers(model, processor, bench, gen_items), strict=True))
        ref = vanilla_answers or self.answers
        self.rouge = {i: rouge_l(a, ref[i]) for i, a in self.answers.items()}

    def acc(self, items: list) -> float | None:
        return sum(self.correct[it.item_id] for it in items) / len(items) if items else None

    def auc(self, items: list) -> float:
        from mip_core.evaluation.mia import auc

        return auc([self.member[it.item_id] for it in items], self.non_member)

    def rouge_mean(self, items: list) -> float:
        return sum(self.rouge[it.item_id] for it in items) / len(items)


def _sets(bench: Any, people: list[str], seed: int) -> dict[str, list]:
    listed = set(people)
    retain = [it for it in bench.items if it.kind == "qa" and it.profile_id not in listed]
    return {"people": [it for it in bench.items if it.kind == "qa" and it.profile_id in listed],
            "retain": retain, "retain_gen": random.Random(seed).sample(retain, min(ROUGE_RETAIN_SAMPLE, len(retain))),
            "utility": [it for it in bench.items if it.kind == "utility"]}


def _of(sets: dict[str, list], people: list[str]) -> list:
    group = set(people)
    return [it for it in sets["people"] if it.profile_id in group]


def _pid(bench: Any, subject: Any) -> str:
    """The profile id a request's subject names: itself (a benchmark id), or the profile with the person's name."""
    if isinstance(subject, str):
        return subject
    return next(p.profile_id for p in bench.profiles if p.name == subject.name)


def register_demo(store_root: str, model: str, bench_dir: str, root: Path, by_name: bool) -> None:
    """Register the demo model as a user would (``mip models register``): with its benchmark (``--dataset``), or
    (``by_name``) with the keep-set files exported from it into ``root/keepsets``. probe_bench registers the same
    way, so its two kinds of request are compared on the registrations the nightly rows use."""
    from mip_core.cli import main as mip

    if not by_name:
        assert mip(["models", "register", "--root", store_root, "--name", "demo", "--model", model, "--dataset",
                    bench_dir]) == 0
        return
    keep = root / "keepsets"
    assert mip(["benchmark", "export", "--bench", bench_dir, "--out", str(keep)]) == 0
    assert mip(["models", "register", "--root", store_root, "--name", "demo", "--model", model, "--retain",
                str(keep / "retain.jsonl"), "--utility", str(keep / "utility.jsonl"), "--templates",
                str(keep / "templates.jsonl")]) == 0


def _subject(bench: Any, pid: str, by_name: bool) -> Any:
    """A request's subject: the profile id, or (``by_name``) only the person's name and training photo."""
    if not by_name:
        return pid
    profile = bench.profile(pid)
    return {"name": profile.name, "photos": [str(Path(bench.root) / profile.image)]}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _batch_rows(store: Any, results: list[dict], scenario: str, night: int) -> list[dict]:
    """One row per batch the night ran: who was in it, its verdict and the gate's figures (on its samples)."""
    rows = []
    for k, res in enumerate(results):
        batch_id = res["batch_id"]
        claim = store.read_json(store.batch_key(batch_id, "claim.json"))
        gate = store.read_json(store.batch_key(batch_id, "gate.json")) if store.exists(
            store.batch_key(batch_id, "gate.json")) else {"scores": [], "passed": False, "reasons": []}
        records = [store.get(r) for r in claim["requests"]]
        mine = [r for r in records if r.batch_id == batch_id]  # not moved on to a split half

        def pooled(name: str, relative: bool) -> float | None:
            """Accuracy after the edit over the set's modalities, or relative to the starting model's."""
            got = [s for s in gate["scores"] if s["items"] == name]
            after = sum(s["n"] * s["after"] for s in got)
            below = sum(s["n"] * (s["before"] if relative else 1) for s in got)
            return after / below if below else None

        rows.append({"scenario": scenario, "night": night, "batch": k, "batch_id": batch_id,
                     "requests": len(claim["requests"]), "version": res["version"],
                     "published": sum(r.state == "done" for r in mine),
                     "failed": sum(r.state == "failed" for r in mine),
                     "held_back": not res["version"], "split_into": res["retry"],
                     "gate_forget_acc": _r(pooled("forget", False)), "gate_retention": _r(pooled("retain", True)),
                     "gate_utility": _r(pooled("utility", True)), "gate_reasons": gate.get("reasons", []),
                     "wall_s": round(sum(res["timings"].values()), 1), "timings": res["timings"],
                     "measured_by": "the gate, on its samples"})
    return rows


def _night_row(scenario: str, night: int, tonight: list[str], earlier: list[list[str]], store: Any, bench: Any,
               sets: dict, m: Measure, gold: Measure, vanilla: Measure, after_own: dict[int, float],
               wall_s: float) -> dict:
    records = [r for r in store.list() if r.request.request_id.startswith(f"n{night}-")]
    earlier_people = [p for group in earlier for p in group]
    rise = [m.acc(_of(sets, group)) - after_own[j] for j, group in enumerate(earlier)]
    everyone = earlier_people + tonight
    done = [_pid(bench, r.request.subjects[0]) for r in store.list() if r.state == "done"]

    def leak(people: list[str]) -> float | None:
        """MUSE's privacy leak of ``people``'s items: (AUC - AUC_gold) / AUC_gold."""
        items = _of(sets, people)
        return (m.auc(items) - gold.auc(items)) / gold.auc(items) if items else None

    return {
        "scenario": scenario, "night": night, "batch": "night", "requests": len(tonight),
        "version": store.current_version("demo"),
        "published": sum(r.state == "done" for r in records), "failed": sum(r.state == "failed" for r in records),
        "forget_acc_tonight": _r(m.acc(_of(sets, tonight))),
        "forget_acc_earlier": _r(m.acc(_of(sets, earlier_people))),
        "earlier_max_rise": _r(max(rise) if rise else None),
        "gold_forget_acc": _r(gold.acc(_of(sets, tonight))),
        "gold_forget_acc_earlier": _r(gold.acc(_of(sets, earlier_people))),
        "forget_minus_gold_all": _r(m.acc(_of(sets, everyone)) - gold.acc(_of(sets, everyone))),
        "vanilla_forget_acc": _r(vanilla.acc(_of(sets, everyone))),
        "done_people": len(done), "forget_acc_done": _r(m.acc(_of(sets, done))),
        "gold_forget_acc_done": _r(gold.acc(_of(sets, done))),
        "privacy_leak_done": _r(leak(done)),
        "retention": _r(m.acc(sets["retain"]) / vanilla.acc(sets["retain"])),
        "utility": _r(m.acc(sets["utility"]) / vanilla.acc(sets["utility"])),
        "retain_rougeL": _r(m.rouge_mean(sets["retain_gen"])), "utility_rougeL": _r(m.rouge_mean(sets["utility"])),
        "mia_auc": _r(m.auc(_of(sets, everyone))), "gold_mia_auc": _r(gold.auc(_of(sets, everyone))),
        "privacy_leak": _r(leak(everyone)),
        "wall_s": round(wall_s, 1), "measured_by": "the whole benchmark, on the version current after the night"}


def run_scenario(name: str, args: argparse.Namespace, people: list[str], bench: Any, sets: dict, gold: Measure,
                 vanilla: Measure, holdout: tuple, spec_overrides: dict) -> list[dict]:
    """Fresh store, register, then each night: submit, run the nightly flow, measure."""
    import ray

    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from mip_core.service.requests import ForgetRequest
    from mip_core.service.store import ServiceStore

    root = Path(args.work) / name
    shutil.rmtree(root, ignore_errors=True)
    store = ServiceStore(str(root / "store"))
    scenario = SCENARIOS[name]
    by_name = scenario.get("by_name", False)
    register_demo(store.root, args.model, str(bench.root), root, by_name)
    spec = ServiceSpec(root=store.root, **{**BASE_SPEC, **scenario["spec"], **spec_overrides})
    rows, groups, after_own, start = [], [], {}, 0
    for night, size in enumerate(scenario["nights"], start=1):
        tonight = people[start:start + size]
        start += size
        for j, pid in enumerate(tonight):
            store.submit(ForgetRequest(request_id=f"n{night}-{j:02d}", target_model="demo",
                                       subjects=[_subject(bench, pid, by_name)], requester="bench", reason="privacy"))
        t0 = time.perf_counter()
        if by_name:
            os.environ["MIP_NO_BENCHMARK"] = "1"  # the batches must not open the benchmark
        try:
            results = nightly_unlearning(spec)
        finally:
            os.environ.pop("MIP_NO_BENCHMARK", None)
            ray.shutdown()
        wall = time.perf_counter() - t0
        version = store.current_version("demo")
        m = Measure(store.uri(store.model_key("demo", version)), sets, holdout, bench, vanilla.answers)
        rows += _batch_rows(store, results, name, night)
        rows.append(_night_row(name, night, tonight, groups, store, bench, sets, m, gold, vanilla, after_own,
                               wall))
        after_own[len(groups)] = m.acc(_of(sets, tonight))
        groups.append(tonight)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "measured_by"}), flush=True)
    return rows


def _people_accuracy(uri: str, bench: Any, people: Any) -> dict[str, float]:
    """Each person's multiple-choice accuracy on their benchmark questions, on the model at ``uri``."""
    from mip_core.evaluation.runner import multiple_choice
    from mip_core.modeling import load_model

    loaded = load_model(uri, device="cpu")
    out = {}
    for p in people:
        items = [it for it in bench.items if it.kind == "qa" and it.profile_id == p]
        out[p] = sum(multiple_choice(loaded.model, loaded.processor, bench, items)) / len(items)
    return out


def person_rise(store_root: str, bench: Any, gold_uri: str | None = None) -> dict[str, Any]:
    """Each forgotten person's multiple-choice accuracy on the version that forgot them, on the store's current
    version and (with ``gold_uri``) on the gold model: whether anyone came back after later edits, on all their
    items (the gate checks a sample of them), and how far each ends from a model that never saw them."""
    from mip_core.service.store import ServiceStore

    store = ServiceStore(store_root)
    done = {_pid(bench, r.request.subjects[0]): str(r.model_version) for r in store.list() if r.state == "done"}
    final = store.current_version("demo")
    acc: dict[tuple[str, str], float] = {}
    models = {v: store.uri(store.model_key("demo", v)) for v in sorted(set(done.values()) | {final})}
    for version, uri in (models | ({"gold": gold_uri} if gold_uri else {})).items():
        acc |= {(p, version): a for p, a in _people_accuracy(uri, bench, done).items()}
    rise = {p: acc[(p, final)] - acc[(p, v)] for p, v in done.items()}
    out = {"final": final, "people": len(done), "pooled_rise": _r(sum(rise.values()) / len(rise) if rise else None),
           "max_person_rise": _r(max(rise.values(), default=None)),
           "risen_over_0.05": sum(r > 0.05 + 1e-9 for r in rise.values()),
           "per_person": {p: {"forgotten_by": v, "then": _r(acc[(p, v)]), "now": _r(acc[(p, final)])}
                          | ({"gold": _r(acc[(p, "gold")])} if gold_uri else {}) for p, v in done.items()}}
    if gold_uri and done:
        gap = [acc[(p, final)] - acc[(p, "gold")] for p in done]
        out |= {"within_0.05_of_gold": sum(abs(g) <= 0.05 + 1e-9 for g in gap), "mean_abs_minus_gold": _r(
            sum(abs(g) for g in gap) / len(gap)), "min_minus_gold": _r(min(gap)), "max_minus_gold": _r(max(gap))}
    return out


def gold_agreement(bench: Any, people: list[str], gold_uris: list[str]) -> dict[str, Any]:
    """Each person's multiple-choice accuracy on two gold models (trained the same way without them, different
    seeds), and how often they agree within 0.05: the per-person yardstick's own noise. Neither saw the people, so
    what they answer right is guessing, and at 11 items a person 0.05 is less than one item."""
    acc = [_people_accuracy(uri, bench, people) for uri in gold_uris]
    gap = [acc[1][p] - acc[0][p] for p in people]
    return {"golds": gold_uris, "people": len(people), "within_0.05": sum(abs(g) <= 0.05 + 1e-9 for g in gap),
            "mean_abs_diff": _r(sum(abs(g) for g in gap) / len(gap)), "pooled": [_r(sum(a.values()) / len(a))
                                                                                for a in acc],
            "per_person": {p: [_r(a[p]) for a in acc] for p in people}}


def failed_people(store_root: str, bench: Any, gold_uri: str) -> dict[str, Any]:
    """Each failed request of a scenario's store: its person's multiple-choice accuracy per modality on the version
    its last batch started from, on the final version, and on the gold model (which never saw them), with the
    recorded reason. Whether a request failed on questions a model that never saw the person answers too."""
    from mip_core.evaluation.runner import multiple_choice
    from mip_core.modeling import load_model
    from mip_core.service.store import ServiceStore
    from tasks.service import manifest_of

    store = ServiceStore(store_root)
    failed = [r for r in store.list() if r.state == "failed"]
    started = {r.request.request_id: manifest_of(store, str(r.batch_id)).base_version for r in failed
               if store.exists(store.batch_key(str(r.batch_id), "manifest.json"))}  # closed unedited: none
    items = {r.request.request_id: [it for it in bench.items if it.kind == "qa"
                                    and it.profile_id == _pid(bench, r.request.subjects[0])] for r in failed}
    final = store.current_version("demo")
    loads = [("start", store.uri(store.model_key("demo", v)), [r for r in items if started.get(r) == v])
             for v in sorted(set(started.values()))]  # (what, model, the requests it is measured for)
    loads += [("final", store.uri(store.model_key("demo", final)), list(items)), ("gold", gold_uri, list(items))]
    acc: dict[tuple[str, str], list[bool]] = {}
    for what, uri, rids in loads:
        loaded = load_model(uri)
        for rid in rids:
            acc[(rid, what)] = multiple_choice(loaded.model, loaded.processor, bench, items[rid])
    out = {}
    for r in failed:
        rid = r.request.request_id
        out[rid] = {"person": _pid(bench, r.request.subjects[0]), "started_from": started.get(rid), "reason": r.reason}
        for modality in sorted({it.modality for it in items[rid]}):
            pos = [k for k, it in enumerate(items[rid]) if it.modality == modality]
            out[rid][modality] = {"n": len(pos)} | {what: _r(sum(acc[(rid, what)][k] for k in pos) / len(pos))
                                                    for what in ("start", "final", "gold") if (rid, what) in acc}
    return {"final": final, "requests": out}


def held_out(store_root: str, bench: Any, sets: dict, vanilla_uri: str) -> dict[str, Any]:
    """Never-requested people's items that no edit of the store held against (no batch's ``edit_retain``): their
    retention (multiple choice) and ROUGE-L against the vanilla model's answers on the final version.

    Why: the night rows measure every never-requested item, and with a large retain pool the edits trained to keep
    most of them, so those rows show protection where it was trained; these items show what an edit does to facts
    it was not told about (a real model knows far more than any keep-set)."""
    from mip_core.evaluation.metrics import rouge_l
    from mip_core.evaluation.runner import generate_answers, multiple_choice
    from mip_core.modeling import load_model
    from mip_core.service.store import ServiceStore
    from tasks.service import manifest_of

    store = ServiceStore(store_root)
    batches = {b for r in store.list() for b in [*r.held_back_in, r.batch_id] if b}  # every batch a request was in
    trained = {i for b in batches if store.exists(store.batch_key(b, "manifest.json"))
               for i in manifest_of(store, b).edit_retain}
    items = [it for it in sets["retain"] if it.item_id not in trained]
    gen = random.Random(0).sample(items, min(ROUGE_RETAIN_SAMPLE, len(items)))
    final = store.current_version("demo")
    got = {}
    for what, uri in (("vanilla", vanilla_uri), ("final", store.uri(store.model_key("demo", final)))):
        loaded = load_model(uri)
        got[what] = (multiple_choice(loaded.model, loaded.processor, bench, items),
                     generate_answers(loaded.model, loaded.processor, bench, gen))
    rouge = [1.0 if a == b else rouge_l(a, b) for a, b in zip(got["final"][1], got["vanilla"][1], strict=True)]
    return {"final": final, "items_held_by_some_edit": len(trained), "n": len(items), "n_generated": len(gen),
            "retention": _r(sum(got["final"][0]) / sum(got["vanilla"][0])) if sum(got["vanilla"][0]) else None,
            "retain_rougeL": _r(sum(rouge) / len(rouge)) if rouge else None}


def table(rows: list[dict]) -> str:
    """The night rows as the markdown table of BENCHMARKS.md section 10."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:+.3f}" if isinstance(x, float) and x < 0 else (
            f"{x:.3f}" if isinstance(x, float) else str(x))

    cols = ("scenario", "night", "requests", "published", "failed", "batches", "forget_acc_tonight",
            "forget_acc_earlier", "earlier_max_rise", "gold_forget_acc", "forget_minus_gold_all", "forget_acc_done",
            "gold_forget_acc_done", "retention", "utility", "retain_rougeL", "utility_rougeL", "privacy_leak",
            "privacy_leak_done", "wall_s")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["batch"] != "night":
            continue
        batches = sum(1 for b in rows if b["scenario"] == r["scenario"] and b["night"] == r["night"]
                      and b["batch"] != "night")
        lines.append("| " + " | ".join(f({**r, "batches": batches}[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo_out/vanilla")
    ap.add_argument("--bench", default="demo_out/bench")
    ap.add_argument("--gold", default="demo_out/nightly_gold", help="trained without every person of the "
                    "scenarios: mip vanilla ... --exclude $(python benches/nightly_bench.py --print-people)")
    ap.add_argument("--people-seed", type=int, default=1, help="forget subset whose order names the people")
    ap.add_argument("--scenarios", default=DEFAULT_SCENARIOS, help=f"any of {', '.join(SCENARIOS)}")
    ap.add_argument("--spec", default="{}", help="ServiceSpec overrides as JSON for every scenario")
    ap.add_argument("--out", default="benches/results/nightly.json")
    ap.add_argument("--work", default="demo_out/nightly_bench")
    ap.add_argument("--person-rise", metavar="STORE", help="print each forgotten person's accuracy then and now "
                    "in a scenario's store (e.g. demo_out/nightly_bench/five_nights/store) and exit")
    ap.add_argument("--failed-people", metavar="STORE", help="print each failed request's person's accuracy "
                    "(starting version, final version, gold model) in a scenario's store and exit")
    ap.add_argument("--held-out", metavar="STORE", help="print retention and ROUGE-L on never-requested items no "
                    "edit of a scenario's store held against, and exit")
    ap.add_argument("--gold-agreement", metavar="GOLD2", help="print each person's accuracy on --gold and on "
                    "GOLD2 (the same recipe, another --seed) and how often they agree within 0.05, and exit")
    ap.add_argument("--table", action="store_true", help="print --out's night rows as a markdown table and exit")
    ap.add_argument("--print-people", action="store_true", help="print the people every scenario draws from "
                    "(comma-separated, for the gold model's --exclude) and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())["rows"]))
        return
    if args.person_rise or args.failed_people:  # for a scenario run before these measures joined the run
        from mip_core.benchmark import load_benchmark

        bench = load_benchmark(args.bench)
        print(json.dumps(person_rise(args.person_rise, bench, args.gold) if args.person_rise
                         else failed_people(args.failed_people, bench, args.gold)))
        return
    from mip_core.benchmark import load_benchmark
    from mip_core.benchmark.holdout import holdout_items
    from mip_core.errors import InputError
    from mip_core.modeling.io import cache_dir
    from mip_core.training import read_training_log

    bench = load_benchmark(args.bench)
    names = args.scenarios.split(",")
    need = max(sum(SCENARIOS[n]["nights"]) for n in SCENARIOS
               if n in names or args.print_people or args.gold_agreement)
    ordered = sorted(bench.with_forget_seed(args.people_seed).profiles, key=lambda p: p.forget_rank)
    people = [p.profile_id for p in ordered][:need]
    if args.print_people:
        print(",".join(people))
        return
    if args.gold_agreement:
        print(json.dumps(gold_agreement(bench, people, [args.gold, args.gold_agreement])))
        return
    excluded = set((read_training_log(args.gold) or {}).get("config", {}).get("exclude_profiles") or ())
    if not set(people) <= excluded:
        raise InputError(f"--gold {args.gold} saw {sorted(set(people) - excluded)[:5]}...; train it with `mip "
                         f"vanilla ... --exclude {','.join(people)}`")
    sets = _sets(bench, sorted(excluded), args.people_seed)  # never requested: outside the gold's whole list
    if args.held_out:
        print(json.dumps(held_out(args.held_out, bench, sets, args.model)))
        return
    holdout = holdout_items(bench, 10, cache_dir())
    t0 = time.perf_counter()
    vanilla = Measure(args.model, sets, holdout, bench)
    gold = Measure(args.gold, sets, holdout, bench, vanilla.answers)
    print(f"vanilla and gold measured in {time.perf_counter() - t0:.0f}s", flush=True)
    out = Path(args.out)
    meta = {"command": "python benches/nightly_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                      for k, v in vars(args).items()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"), "people": people, "base_spec": BASE_SPEC,
            "vanilla": {"people_acc": vanilla.acc(sets["people"]), "retain_acc": vanilla.acc(sets["retain"]),
                        "utility_acc": vanilla.acc(sets["utility"]), "mia_auc": vanilla.auc(sets["people"])},
            "gold": {"people_acc": gold.acc(sets["people"]), "retain": gold.acc(sets["retain"]) / vanilla.acc(
                sets["retain"]), "utility": gold.acc(sets["utility"]) / vanilla.acc(sets["utility"]),
                     "retain_rougeL": gold.rouge_mean(sets["retain_gen"]), "mia_auc": gold.auc(sets["people"])},
            "rows": []}
    if out.exists():  # keep other scenarios' rows of an earlier run on the same people
        earlier = json.loads(out.read_text())
        if earlier.get("people", [])[:need] == people:
            meta["rows"] = [r for r in earlier["rows"] if r["scenario"] not in names]
    for name in names:
        meta["rows"] += run_scenario(name, args, people, bench, sets, gold, vanilla, holdout, json.loads(args.spec))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(meta, indent=1) + "\n")  # the rows first: the measures below load models again
        if len(SCENARIOS[name]["nights"]) > 1:
            meta.setdefault("person_rise", {})[name] = person_rise(str(Path(args.work) / name / "store"), bench,
                                                                   args.gold)
        meta.setdefault("failed_people", {})[name] = failed_people(str(Path(args.work) / name / "store"), bench,
                                                                   args.gold)
        meta.setdefault("held_out", {})[name] = held_out(str(Path(args.work) / name / "store"), bench, sets,
                                                         args.model)
        out.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}\n{table(meta['rows'])}")


if __name__ == "__main__":
    main()
