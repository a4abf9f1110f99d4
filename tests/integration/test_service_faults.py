"""A batch that must not be published: the gate holds it back, or a step crashes. Nothing is published, every
request ends failed with its reason (and the gate's metrics), and the report says why.

Real Prefect (the test harness's server), a real local Ray cluster, the in-process edit on the session's trained
tiny model; the store is a local folder (the S3 path is covered by test_service_e2e).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mip_core.benchmark import load_benchmark
from mip_core.service.requests import ForgetRequest
from mip_core.service.store import ServiceStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BASE = {"n_actors": 1, "launcher": "inprocess", "attribution": {"steps": 2, "top_k": 8}, "retain_limit": 20}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A Prefect test server and a local Ray cluster for this module (shut down after it: other modules start
    their own)."""
    import ray
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay short
    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=180):
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
            try:
                yield
            finally:
                ray.shutdown()
                shutil.rmtree(ray_tmp, ignore_errors=True)


def _store_with_requests(tmp_path, trained_tiny, n: int) -> tuple[ServiceStore, list[str]]:
    model_dir, bench_dir = trained_tiny
    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("tiny", model_dir, dataset_uri=bench_dir)
    people = [p.profile_id for p in load_benchmark(bench_dir).profiles][:n]
    ids = [f"f-{k}" for k in range(n)]
    for rid, person in zip(ids, people, strict=True):
        store.submit(ForgetRequest(request_id=rid, target_model="tiny", subjects=[person], requester="t",
                                   reason="privacy"))
    return store, ids


def test_a_batch_below_the_gate_is_not_published(harness, trained_tiny, tmp_path):
    from flows.params import ServiceSpec
    from flows.service import unlearn_batch

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    # one RMisU step cannot make the model forget: the forgetting floor of 0.9 must stop the batch, and each
    # request, retried alone before it fails, again
    spec = ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"steps": 1}},
                       gate={"min_forgetting": 0.9, "min_retention": 0.0, "min_utility": 0.0})
    result = unlearn_batch(ids, spec)

    assert result["version"] is None and [r["version"] for r in result["retried"]] == [None, None]
    assert store.versions("tiny") == ["v0001"] and store.current_version("tiny") == "v0001"
    for rid, alone in zip(ids, result["retried"], strict=True):
        record = store.get(rid)
        assert record.state == "failed" and record.reason.startswith("gate: "), record
        assert "forgetting rate" in record.reason and "the model still knows them" in record.reason, record
        assert record.model_version is None and record.batch_id == alone["batch_id"], record
        assert record.held_back_in == [result["batch_id"]] and alone["retry"] == []  # alone: not split again
        assert record.metrics is not None and record.metrics["before"] > 0  # the gate's numbers travel along
        assert record.report_uri == alone["report"]
    report = store.read_text(store.batch_key(result["batch_id"], "report.md"))
    assert "**not published**: forget" in report and "publish" not in result["timings"]


def test_a_batch_held_back_for_other_people_is_split_until_each_request_is_judged_alone(harness, trained_tiny,
                                                                                      tmp_path):
    from flows.params import ServiceSpec
    from flows.service import unlearn_batch
    from tasks.service import manifest_of

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    # every request forgets enough (floor 0), but nobody else's answer may change (floor 1.0): the edit of two
    # people together is held back for the kept sets, not for either request's own figures. The fixed-budget edit
    # (40 steps at 3e-2, no check) disturbs others' answers; 40 small steps of the adaptive default may not.
    spec = ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"steps": 40, "lr": 3e-2, "check_every": 0}},
                       gate={"min_forgetting": 0.0, "min_retention": 1.0, "min_utility": 1.0})
    result = unlearn_batch(ids, spec)
    combined = result["batch_id"]
    assert result["version"] is None and len(result["retry"]) == 2, result  # held back, split in two
    halves = [r["batch_id"] for r in result["retried"]]
    assert halves == result["retry"]
    for rid, half in zip(ids, halves, strict=True):
        record = store.get(rid)
        assert record.held_back_in == [combined] and record.batch_id == half, record  # the record keeps both
        assert manifest_of(store, half).requests == (rid,)  # judged alone
        assert record.state in ("done", "failed"), record
        if record.state == "failed":  # alone, so the figures are its own
            assert record.reason.startswith("gate: ") and record.metrics, record
        else:
            assert record.model_version in store.versions("tiny") and record.model_version != "v0001", record
    # the second half starts from whatever the first published
    first = result["retried"][0]["version"] or "v0001"
    assert manifest_of(store, halves[1]).base_version == first
    report = store.read_text(store.batch_key(combined, "report.md"))
    assert all(f"retried in `{half}`" in report for half in halves), report


def test_a_night_edits_its_queue_in_batches_each_on_the_version_before(harness, trained_tiny, tmp_path):
    """Five requests, two per batch: three batches claimed at once, edited in submission order, each planned on
    the version the batch before published; the later ones re-check the people the earlier ones forgot; and no
    request fails unless it was judged alone (a request its batch did not make forgotten is retried alone)."""
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from tasks.service import manifest_of

    store, ids = _store_with_requests(tmp_path, trained_tiny, 5)
    spec = ServiceSpec(root=store.root, **BASE, requests_per_batch=2, edit={"rmisu": {"steps": 40}},
                       gate={"min_retention": 0.0, "min_utility": 0.0, "min_generation": 0.0,
                             "max_relapse": 1.0})  # kept sets never hold back: each batch publishes if any forgot
    results = nightly_unlearning(spec)
    batches = {r["batch_id"]: manifest_of(store, r["batch_id"]) for r in results}
    retried = {b for r in results for b in r["retry"]}

    assert [batches[r["batch_id"]].requests for r in results if r["batch_id"] not in retried] == [
        tuple(ids[:2]), tuple(ids[2:4]), (ids[4],)]
    published = ["v0001"]
    for r in results:  # each batch starts from the version the one before it published
        assert batches[r["batch_id"]].base_version == published[-1], (r, published)
        published += [r["version"]] if r["version"] else []
    assert store.versions("tiny") == published and len(published) >= 2
    for rid in ids:
        record = store.get(rid)
        if record.state == "done":
            assert record.model_version == next(r["version"] for r in results if r["batch_id"] == record.batch_id)
        else:  # judged alone: its last batch held it only, and the figures are its own
            assert record.state == "failed" and batches[record.batch_id].requests == (rid,), record
            assert record.reason.startswith("gate: ") and record.metrics, record
    later = [r["batch_id"] for r in results if batches[r["batch_id"]].base_version != "v0001"]
    gate = store.read_json(store.batch_key(later[-1], "gate.json"))
    # earlier versions' people are re-checked against their accuracy right after the edit that forgot them, read
    # here from those batches' own scores of their edited models, not against the version this edit started from
    earlier = dict(batches[later[-1]].eval_earlier)  # item id -> request id
    assert earlier and all(store.get(rid).state == "done" for rid in earlier.values())

    def scored_at(where: Path) -> dict[str, bool]:
        table = pq.read_table(where / "scores" / "item_scores.parquet")
        return dict(zip(table.column("item_id").to_pylist(), table.column("correct").to_pylist(), strict=True))

    def scored(batch_id: str) -> dict[str, bool]:
        return scored_at(tmp_path / "store" / "batches" / batch_id)

    level = {i: scored(store.get(rid).batch_id)[i] for i, rid in earlier.items()}  # the batch that forgot it
    modality = {it.item_id: it.modality for it in load_benchmark(trained_tiny[1]).items}
    for s in (s for s in gate["scores"] if s["items"] == "earlier"):
        mine = [level[i] for i in earlier if modality[i] == s["modality"]]
        assert s["n"] == len(mine) and s["before"] == pytest.approx(sum(mine) / len(mine)), (s, mine)
    # ... and one by one, each person on their own items of the sample, against that same level
    now = scored(later[-1])  # the edited model's scores
    assert set(gate["earlier_people"]) == set(earlier.values())
    for rid, figures in gate["earlier_people"].items():
        mine = [i for i, r in earlier.items() if r == rid]
        assert figures["n"] == len(mine) and figures["before"] == pytest.approx(sum(level[i] for i in mine) / len(mine))
        assert figures["after"] == pytest.approx(sum(now[i] for i in mine) / len(mine)), (rid, figures)
    # the edit keeps them forgotten: it was given the same sample, and each of its checks measured them apart
    edit = store.read_json(store.batch_key(later[-1], "edited", "unlearn.json"))
    assert [tuple(p) for p in store.read_json(store.batch_key(later[-1], "edit_config.json"))["earlier"]] == list(
        batches[later[-1]].eval_earlier)
    checks = [p for p in edit["curve"] if "known" in p]
    assert len(checks) == 4 and all("known_earlier" in p for p in checks), checks  # 40 steps, checked every 10
    # the kept sets are also held against the registered model: its own cached scores, not the starting version's
    assert store.read_json(store.batch_key(results[0]["batch_id"], "gate.json"))["registered"] is None  # on v0001
    registered = scored_at(tmp_path / "store" / "models" / "tiny" / "v0001")
    assert gate["registered"]["version"] == "v0001"
    kept = {"retain": batches[later[-1]].eval_retain, "utility": batches[later[-1]].eval_utility}
    for s in gate["registered"]["scores"]:
        mine = [registered[i] for i in kept[s["items"]] if modality[i] == s["modality"]]
        assert s["n"] == len(mine) and s["before"] == pytest.approx(sum(mine) / len(mine)), (s, mine)
    assert store.list("pending") == [] and store.list("claimed") == []


FLOORS_OFF = {"min_forgetting": 0.0, "min_retention": 0.0, "min_utility": 0.0, "min_generation": 0.0}


def _eroded_then(tmp_path, trained_tiny, n_later: int) -> tuple[ServiceStore, list[str], dict]:
    """Night 1 publishes a fixed-budget edit without retain terms, which disturbs other people's answers (no floor
    holds it back); then ``n_later`` requests for the other people are queued. Returns the store, their ids and
    night 2's spec: nobody else's answer may differ from the registered model's (retention floor 1.0), with an
    edit of one step at lr 1e-8, which changes no answer of the version it starts from; so any batch of night 2
    is held back by the floor against the registered model and nothing else."""
    store, ids = _store_with_requests(tmp_path, trained_tiny, n_later + 1)
    for rid in ids[1:]:  # night 2's: set aside while night 1 runs
        store.finish(rid, "rejected", reason="not tonight")
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning

    nightly_unlearning(ServiceSpec(root=store.root, **BASE, gate=FLOORS_OFF,  # no retain term: others drift
                                   edit={"rmisu": {"steps": 40, "lr": 3e-2, "check_every": 0, "retain_weight": 0,
                                                   "retain_ce_weight": 0}}))
    assert store.versions("tiny") == ["v0001", "v0002"]
    later = [f"g-{k}" for k in range(1, n_later + 1)]
    for rid, was in zip(later, ids[1:], strict=True):
        store.submit(ForgetRequest(request_id=rid, target_model="tiny", subjects=list(store.get(was).request.subjects),
                                   requester="t", reason="privacy"))
    night2 = {"root": store.root, **BASE, "gate": FLOORS_OFF | {"min_retention": 1.0},
              "edit": {"rmisu": {"steps": 1, "lr": 1e-8, "check_every": 0}}}
    return store, later, night2


def _held_by_the_registered_floors_alone(store: ServiceStore, batch_id: str) -> dict:
    gate = store.read_json(store.batch_key(batch_id, "gate.json"))
    per_edit = [s["relative"] for s in gate["scores"] if s["items"] == "retain"]
    assert per_edit and all(r == 1.0 for r in per_edit), gate["scores"]  # the edit changed no answer
    assert gate["reasons"] == gate["registered_reasons"] and gate["reasons"], gate  # held back by those alone
    assert all("since the registered model v0001" in r for r in gate["reasons"]) and gate["registered"]["version"] \
        == "v0001"
    return gate


def test_once_one_request_alone_is_held_back_by_the_floors_against_the_registered_model_close_ends_the_rest(
        harness, trained_tiny, tmp_path):
    """With ``when_spent="close"``: the first request, alone in its batch, is held back by the floor against the
    registered model and nothing else, so the second is closed failed, unedited, naming the remedy."""
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from tasks.service import manifest_of

    store, _, night2 = _eroded_then(tmp_path, trained_tiny, 2)
    first, second = nightly_unlearning(ServiceSpec(**night2, requests_per_batch=1, when_spent="close"))

    assert store.versions("tiny") == ["v0001", "v0002"]  # nothing published on night 2
    assert manifest_of(store, first["batch_id"]).requests == ("g-1",)
    _held_by_the_registered_floors_alone(store, first["batch_id"])
    held, unedited = store.get("g-1"), store.get("g-2")
    assert held.state == "failed" and "since the registered model v0001" in held.reason, held
    assert unedited.state == "failed" and unedited.reason.startswith("not edited: "), unedited
    assert unedited.batch_id == second["batch_id"] and first["spent"] == unedited.reason
    assert second["spent"] == unedited.reason and second["version"] is None
    assert not store.exists(store.batch_key(second["batch_id"], "manifest.json"))  # never planned nor edited
    assert unedited.reason in store.read_text(store.batch_key(second["batch_id"], "report.md"))


def test_once_the_lineage_is_at_its_floors_each_remaining_request_is_edited_and_judged_alone(
        harness, trained_tiny, tmp_path):
    """By default (``when_spent="alone"``), batches of 2: the first is held back and split; its first request,
    alone, is held back by the floor against the registered model alone. From then on every request of the model
    is edited in a batch of its own, the queued batch of two as well (moved unplanned, its report says where),
    and each ends failed with its own gate's figures: none closed unedited, none for a batch it shared."""
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from tasks.service import manifest_of

    store, later, night2 = _eroded_then(tmp_path, trained_tiny, 4)
    results = nightly_unlearning(ServiceSpec(**night2, requests_per_batch=2))

    assert store.versions("tiny") == ["v0001", "v0002"]  # nothing published on night 2
    assert store.list("pending") == [] and store.list("claimed") == []
    edited = {r["batch_id"]: manifest_of(store, r["batch_id"]).requests for r in results}
    assert [len(reqs) for reqs in edited.values()] == [2, 1, 1, 1, 1], edited  # A, its halves, then B's singles
    assert results[1]["spent"] and edited[results[1]["batch_id"]] == ("g-1",)
    for rid in later:
        record = store.get(rid)
        assert record.state == "failed" and edited[record.batch_id] == (rid,), record  # judged alone
        _held_by_the_registered_floors_alone(store, record.batch_id)
        assert record.reason.startswith("gate: ") and "since the registered model v0001" in record.reason, record
    queued_pair = store.get("g-3").held_back_in[-1]
    assert queued_pair == store.get("g-4").held_back_in[-1] and queued_pair not in edited  # moved, never edited
    report = store.read_text(store.batch_key(queued_pair, "report.md"))
    assert "each request moved to a batch of its own" in report and store.get("g-3").batch_id in report


def test_a_spent_lineage_closes_only_the_batches_this_run_still_owns(harness, trained_tiny, tmp_path):
    """A batch another run adopted (this run's lease lapsed) is left to that run, claimed; the batch this run
    still owns is closed failed, unedited, with the reason."""
    from prefect import flow

    from flows.params import ServiceSpec
    from flows.service import close_unedited
    from mip_core.service.runs import RunLease, write_claim

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    why = "not edited: the model's versions since the registered v0001 have spent what the gate's floors allow"
    with RunLease(store, ttl_s=600) as run:
        for rid, batch_id, owner in ((ids[0], "b-mine", run.run_id), (ids[1], "b-theirs", "run-other")):
            store.claim([rid], batch_id)
            write_claim(store, batch_id, "tiny", [rid], owner)

        @flow
        def close_both() -> list[list[dict]]:
            spec = ServiceSpec(root=str(tmp_path / "store"))
            return [close_unedited(store, spec, b, run.run_id, why) for b in ("b-mine", "b-theirs")]

        mine, theirs = close_both()
    assert theirs == [] and store.get(ids[1]).state == "claimed"
    assert [r["spent"] for r in mine] == [why] and mine[0]["version"] is None
    assert (store.get(ids[0]).state, store.get(ids[0]).reason) == ("failed", why)


def test_a_crashing_step_fails_every_request_and_publishes_nothing(harness, trained_tiny, tmp_path):
    from flows.params import ServiceSpec
    from flows.service import unlearn_batch

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    # the edit step raises at run time: only the loaded model tells that it has no layer 99
    spec = ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"layer": 99}})
    with pytest.raises(RuntimeError, match=r"edit step failed: .*layer=99") as caught:
        unlearn_batch(ids, spec)

    assert store.versions("tiny") == ["v0001"] and store.current_version("tiny") == "v0001"
    batch_ids = {store.get(rid).batch_id for rid in ids}
    assert len(batch_ids) == 1
    [batch_id] = batch_ids
    for rid in ids:
        record = store.get(rid)
        assert record.state == "failed" and record.reason.startswith("edit step failed:"), record
    assert store.list("pending") == [] and store.list("claimed") == []  # nothing left half-way
    report = store.read_text(store.batch_key(batch_id, "report.md"))
    assert "**failed**: edit step failed" in report and str(caught.value).endswith(
        store.uri(store.batch_key(batch_id, "report.md")))


def test_a_batch_whose_plan_fails_closes_every_request_and_is_not_looped_on(harness, trained_tiny, tmp_path):
    """The dataset a model was registered with disappears: the plan step fails (not retried: no retry brings a
    folder back), every request ends failed with the reason and a report, and the next night has nothing to do."""
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning

    model_dir, bench_dir = trained_tiny
    bench_copy = shutil.copytree(bench_dir, tmp_path / "bench")
    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("tiny", model_dir, dataset_uri=str(bench_copy))
    person = load_benchmark(bench_copy).profiles[0].profile_id
    for rid in ("g-0", "g-1"):
        store.submit(ForgetRequest(request_id=rid, target_model="tiny", subjects=[person], requester="t",
                                   reason="privacy"))
    (bench_copy / "manifest.json").unlink()

    with pytest.raises(RuntimeError, match="failed"):
        nightly_unlearning(ServiceSpec(root=store.root, **BASE))
    for rid in ("g-0", "g-1"):
        record = store.get(rid)
        assert record.state == "failed", record
        assert record.reason.startswith("plan step failed: BenchmarkSchemaError"), record.reason
        assert store.exists(record.report_uri.removeprefix(store.root + "/"))
    assert store.list("claimed") == [] and store.versions("tiny") == ["v0001"]
    assert nightly_unlearning(ServiceSpec(root=store.root, **BASE)) == []  # nothing left to adopt


def test_a_batch_that_failed_the_same_way_twice_is_closed_not_adopted(harness, trained_tiny, tmp_path):
    """A batch left claimed (its close failed too, twice, with the same error) is closed failed by the next
    nightly run with the reason, instead of being resumed every night."""
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from mip_core.service.runs import record_failure, write_claim

    store, ids = _store_with_requests(tmp_path, trained_tiny, 1)
    store.claim(ids, "b-stuck")
    write_claim(store, "b-stuck", "tiny", ids, "run-gone")  # its run holds no lease: orphaned
    for run in ("run-a", "run-b"):
        record_failure(store, "b-stuck", run, "plan step failed: StoreUnavailable: endpoint refused")

    assert nightly_unlearning(ServiceSpec(root=store.root, **BASE)) == []  # nothing adopted, nothing new
    record = store.get(ids[0])
    assert record.state == "failed" and record.reason.startswith("batch abandoned: failed the same way in 2 runs")
    assert "owner" in store.read_json(store.batch_key("b-stuck", "claim.json"))
    assert store.read_json(store.batch_key("b-stuck", "claim.json"))["owner"] == "run-gone"  # never adopted


def test_a_bad_setting_fails_the_run_before_any_request_is_claimed(harness, trained_tiny, tmp_path):
    """A typo in the deployment's edit settings, or an RMisU batch smaller than the edit job's ranks, is the
    operator's to fix: the run fails at once naming the field, and the requests wait, still pending."""
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from mip_core.errors import InputError

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    with pytest.raises(InputError, match=r"stpes"):
        nightly_unlearning(ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"stpes": 30}}))
    with pytest.raises(InputError, match=r"edit.rmisu.batch_size=2 is below the edit job's 4 ranks"):
        nightly_unlearning(ServiceSpec(root=store.root, **{**BASE, "launcher": "deepspeed", "ranks": 4},
                                       edit={"rmisu": {"batch_size": 2}}))
    assert [store.get(r).state for r in ids] == ["pending", "pending"]
    assert not store.exists("batches")  # nothing claimed, no batch started


class Killed(BaseException):
    """Stands in for the flow process being killed: not an ``Exception``, so nothing in the flow catches it, the
    batch is not closed and its requests stay claimed, as after a SIGKILL."""


def test_a_killed_run_resumes_after_its_last_completed_step(harness, trained_tiny, tmp_path, monkeypatch):
    import tasks.service as service_tasks
    from flows.params import ServiceSpec
    from flows.service import unlearn_batch
    from mip_core.errors import InputError

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    spec = ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"steps": 30}},
                       gate={"min_forgetting": 0.0, "min_retention": 0.0, "min_utility": 0.0,
                             "min_generation": 0.0})
    calls = {"attribute": 0, "edit": 0}
    real_attribute, real_launch, real_promote = (service_tasks.attribute_batch, service_tasks.launch_edit,
                                                 service_tasks.promote_scores)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def kill(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(service_tasks, "attribute_batch", counted("attribute", real_attribute))
    # run 1: killed as the edit job starts
    monkeypatch.setattr(service_tasks, "launch_edit", kill)
    with pytest.raises(Killed):
        unlearn_batch(ids, spec)
    [batch_id] = {store.get(r).batch_id for r in ids}
    assert [store.get(r).state for r in ids] == ["claimed", "claimed"]  # nothing closed, nothing lost
    steps = tmp_path / "store" / "batches" / batch_id / "steps"
    assert sorted(p.stem for p in steps.glob("*.json")) == ["attribute", "plan", "reduce"]

    # run 2: resumed; killed after the model was published but before the publish step completed (recorded)
    monkeypatch.setattr(service_tasks, "launch_edit", counted("edit", real_launch))
    monkeypatch.setattr(service_tasks, "promote_scores", kill)
    with pytest.raises(Killed):
        unlearn_batch(batch_id=batch_id, spec=spec)
    assert store.versions("tiny") == ["v0001", "v0002"] and [store.get(r).state for r in ids] == ["claimed"] * 2
    assert "publish" not in {p.stem for p in steps.glob("*.json")}

    # run 3: resumed again; publish finds its own version instead of making v0003, then every request closes
    monkeypatch.setattr(service_tasks, "promote_scores", real_promote)
    result = unlearn_batch(batch_id=batch_id, spec=spec)
    assert result["version"] == "v0002" and store.versions("tiny") == ["v0001", "v0002"]
    assert calls == {"attribute": 1, "edit": 1}  # no step ran twice
    assert {"plan (resumed)", "attribute (resumed)", "edit (resumed)", "publish"} <= set(result["timings"])
    for rid in ids:
        record = store.get(rid)
        assert (record.state, record.model_version, record.batch_id) == ("done", "v0002", batch_id)
    assert store.model_info("tiny")["batch_id"] == batch_id
    with pytest.raises(InputError, match="nothing to resume"):
        unlearn_batch(batch_id=batch_id, spec=spec)


def test_a_killed_flow_process_is_resumed_by_the_next_nightly_run(harness, trained_tiny, tmp_path, monkeypatch):
    """A real kill: the flow runs in its own process (same Prefect server, same Ray cluster), which is SIGKILLed
    with its whole process group once attribution has completed. Its run lease stops being renewed; after the
    lease's ttl the next nightly run finds the batch orphaned, adopts it and resumes it after its last completed
    step (no second attribution); every request ends done, one version is published."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL

    import tasks.service as service_tasks
    from flows.params import ServiceSpec
    from flows.service import nightly_unlearning
    from mip_core.service.runs import orphaned_batches

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    spec = ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"steps": 30}}, run_lease_ttl_s=4,
                       gate={"min_forgetting": 0.0, "min_retention": 0.0, "min_utility": 0.0,
                             "min_generation": 0.0})
    code = ("import json, sys\nfrom flows.params import ServiceSpec\nfrom flows.service import unlearn_batch\n"
            "unlearn_batch(json.loads(sys.argv[1]), ServiceSpec.model_validate_json(sys.argv[2]))\n")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(tmp_path / "home"),
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log_path = tmp_path / "killed-run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(ids), spec.model_dump_json()], env=env,
                                cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the kill takes its children
    steps = tmp_path / "store" / "batches"

    def attributed() -> bool:
        """The attribution's result record is written whole (a record cut short by the kill would be rerun)."""
        records = list(steps.glob("*/steps/attribute.json"))
        with contextlib.suppress(ValueError):
            return bool(records) and bool(json.loads(records[0].read_text()))
        return False

    try:
        deadline = time.monotonic() + 300
        while not attributed():
            assert proc.poll() is None, f"the run ended before it could be killed:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "attribution did not complete in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    [batch_id] = {store.get(r).batch_id for r in ids}
    assert [store.get(r).state for r in ids] == ["claimed", "claimed"]  # nothing closed, nothing lost
    dead_owner = store.read_json(store.batch_key(batch_id, "claim.json"))["owner"]

    deadline = time.monotonic() + 30  # the dead run's lease expires within its ttl (4 s) of its last heartbeat
    while orphaned_batches(store) != [batch_id]:
        assert time.monotonic() < deadline, "the killed run's lease never expired"
        time.sleep(0.2)

    attributions = []
    real_attribute = service_tasks.attribute_batch
    monkeypatch.setattr(service_tasks, "attribute_batch",
                        lambda *a, **kw: attributions.append(1) or real_attribute(*a, **kw))
    [result] = nightly_unlearning(spec)
    assert result["batch_id"] == batch_id and result["version"] == "v0002" and attributions == []
    assert store.versions("tiny") == ["v0001", "v0002"]
    for rid in ids:
        record = store.get(rid)
        assert (record.state, record.model_version, record.batch_id) == ("done", "v0002", batch_id)
    claim = store.read_json(store.batch_key(batch_id, "claim.json"))
    assert claim["adopted_from"] == [dead_owner] and claim["owner"] != dead_owner  # the audit trail of the takeover
    with get_client(sync_client=True) as client:  # the killed run no longer shows as Running in the UI
        dead_run = client.read_flow_run(dead_owner.removeprefix("run-"))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[dead_run.id])))
    assert dead_run.state.is_crashed() and batch_id in dead_run.state.message
    assert [c.name for c in children] == [f"batch-{batch_id}"] and children[0].state.is_crashed()
    assert nightly_unlearning(spec) == [] and orphaned_batches(store) == []


def test_a_step_result_is_cached_in_the_s3_store_itself(harness, monkeypatch):
    """A batch step's Prefect cache record lives with the batch in the store (moto S3 here): the second call is a
    Cached task run and the step ran once, also after the storage block was deleted from Prefect's database (a
    fresh Prefect server knows nothing of the batch)."""
    import socket

    from moto.server import ThreadedMotoServer
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    from tasks.service import batches_storage, step_cache

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("MIP_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    root, calls = "s3://mip-steps/svc", []
    store = ServiceStore(root)
    store.write_text("README", "a service store\n")  # creates the bucket

    @task
    def attribute(batch_id: str) -> list[dict]:
        calls.append(batch_id)
        return [{"uri": f"{root}/batches/{batch_id}/shards/0", "n_paths": 3}]

    @flow
    def run_step() -> tuple[str, list[dict]]:
        storage = batches_storage(root)  # as process_batch makes it, once per run of the batch
        done = attribute.with_options(**step_cache(storage, "b-1", "attribute"))("b-1", return_state=True)
        return done.name, done.result()

    try:
        first = run_step()
        with get_client(sync_client=True) as client:
            for doc in client.read_block_documents():
                if doc.name and doc.name.startswith("mip-batches-"):
                    client.delete_block_document(doc.id)
        second = run_step()
        assert store.exists(store.batch_key("b-1", "steps", "attribute.json"))  # with the batch
    finally:
        server.stop()
    shards = [{"uri": "s3://mip-steps/svc/batches/b-1/shards/0", "n_paths": 3}]
    assert first == ("Completed", shards) and second == ("Cached", shards) and calls == ["b-1"]


def test_an_s3_outage_is_retried_and_a_long_one_fails_clearly(harness, monkeypatch):
    """The store's S3 server goes away. Back within the step's retry delay: the claim succeeds on a retry. Gone
    for good: the step fails with the store's name and the fix, and the queue is untouched."""
    import socket

    from moto.server import ThreadedMotoServer
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from mip_core.service.store import StoreUnavailable
    from tasks.service import claim_pending, transient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MIP_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("MIP_S3_MAX_ATTEMPTS", "1")  # no client-side retries: the step's retry must do it
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    root = "s3://mip-outage/svc"
    store = ServiceStore(root)
    for k in range(2):
        store.submit(ForgetRequest(request_id=f"o-{k}", target_model="tiny", subjects=["p0001"], requester="t",
                                   reason="privacy"))

    def restart() -> None:
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()  # moto keeps its data in this process: the bucket is still there

    def back_after_first_failure(task, task_run, state) -> bool:
        """The task's own retry condition, and the outage ends as the first attempt has failed."""
        if len(servers) == 1:
            restart()
        return transient(task, task_run, state)

    condition = {"fn": back_after_first_failure}

    @flow
    def claim(delays: list[float]) -> list[str]:
        return claim_pending.with_options(retries=2, retry_delay_seconds=delays,
                                          retry_condition_fn=condition["fn"])(root, None, 10, "run-outage-test")

    try:
        # a short outage: down until the first attempt has failed; the retry a second later succeeds
        servers[0].stop()
        state = claim([1.0, 1.0], return_state=True)
        assert state.is_completed(), state
        [batch_id] = state.result()
        assert sorted(r.request_id for r in store.list("claimed")) == ["o-0", "o-1"]
        assert {r.batch_id for r in store.list("claimed")} == {batch_id}
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        assert [r.run_count for r in runs if r.name.startswith("claim-pending")] == [2]

        # a long outage: every attempt fails; one clear error, and nothing in the queue moved
        store.submit(ForgetRequest(request_id="o-2", target_model="tiny", subjects=["p0001"], requester="t",
                                   reason="privacy"))
        servers[-1].stop()
        condition["fn"] = transient
        state = claim([0.5, 0.5], return_state=True)
        assert state.is_failed()
        with pytest.raises(StoreUnavailable, match=rf"s3://mip-outage/svc is unreachable at {endpoint}"):
            state.result()
        restart()
        assert [r.request_id for r in store.list("pending")] == ["o-2"]
        assert sorted(r.request_id for r in store.list("claimed")) == ["o-0", "o-1"]
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()


@pytest.mark.timeout(900)
def test_a_crashing_deepspeed_rank_fails_the_step_and_publishes_nothing(harness, trained_tiny, tmp_path):
    """SIGKILL rank 1 of the 2-rank DeepSpeed edit job, on the first attempt and on the step's retry. Policy: the
    edit step fails after its retry, nothing is published, and every request of the batch ends ``failed`` with
    the job's exit and log tail (a failed request can be resubmitted as is)."""
    import threading

    import psutil

    from flows.params import ServiceSpec
    from flows.service import unlearn_batch

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    spec = ServiceSpec(root=store.root, **{**BASE, "launcher": "deepspeed"}, ranks=2,
                       edit={"rmisu": {"steps": 400}})
    killed: list[int] = []
    stop = threading.Event()

    def kill_rank_one() -> None:
        while not stop.wait(0.2):
            for proc in psutil.Process().children(recursive=True):  # this test's job only, never another's
                cmd = ""
                with contextlib.suppress(psutil.Error):
                    cmd = " ".join(proc.cmdline())
                if "mip_core.entrypoints.edit" in cmd and "--local_rank=1" in cmd and proc.pid not in killed:
                    killed.append(proc.pid)
                    stop.wait(1.0)  # let it start (load the model, join the process group), then kill it
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()

    watcher = threading.Thread(target=kill_rank_one, daemon=True)
    watcher.start()
    try:
        with pytest.raises(RuntimeError, match=r"edit step failed: EditJobError: edit job exited with code"):
            unlearn_batch(ids, spec)
    finally:
        stop.set()
        watcher.join(10)
    assert len(killed) == 2  # the first attempt and the step's one retry
    assert store.versions("tiny") == ["v0001"] and store.current_version("tiny") == "v0001"
    for rid in ids:
        record = store.get(rid)
        assert record.state == "failed" and "edit job exited with code" in record.reason, record
    [batch_id] = {store.get(rid).batch_id for rid in ids}
    log = (tmp_path / "store" / "batches" / batch_id / "logs" / "edit.log").read_text()
    assert sum(line.startswith("$ ") for line in log.splitlines()) == 2  # both attempts are in the kept log
