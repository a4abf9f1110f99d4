"""The unlearning service's flows: ``nightly-unlearning``, ``unlearn-batch`` and ``submit-request``.

A night claims every pending request, in batches of ``ServiceSpec.requests_per_batch``, and edits them one after
another, each on the version the batch before published.
A batch is a recipe of storage-keyed steps: plan -> attribute (Ray) -> reduce -> edit (DeepSpeed) -> evaluate and
gate -> publish -> close. A held-back batch of several requests is split in two and each half retried the same
night, on the version the one before published, and a published batch retries alone the requests it did not make
forgotten (``ServiceSpec.split_held_back``). Once one request alone is held back by the gate's floors against the
registered model and nothing else (``gate.lineage_spent``), the model's remaining requests of the run are edited
one at a time, or closed failed unedited (``ServiceSpec.when_spent``). Whatever happens, ``close`` gives every
claimed request a terminal record (done, or failed with the reason), so no request is lost; a failed step still
fails the run, so operators see it. A run whose process dies leaves its batch claimed; its lease lapses and the
next run resumes the batch (``runs``), unless the batch failed the same way twice or its runs died three times:
then it is closed failed, never looped on.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.params import ServiceSpec
from mip_core.errors import InputError
from mip_core.service.requests import ForgetRequest
from mip_core.service.runs import (BatchTakenOver, RunLease, check_owner, new_run_id, record_failure, split_unplanned,
                                   target_of)
from mip_core.service.store import ServiceStore
from tasks.service import (adopt_batch, attribute_task, batches_storage, check_settings, claim_pending,
                           claim_requests, close_task, edit_task, gate_task, plan_batch_task, publish_task,
                           reduce_task, step_cache, summarize_task)


def _run_lease(spec: ServiceSpec) -> RunLease:
    """This run's lease, renewed while it lives: a batch it leaves claimed is resumed by the next run."""
    return RunLease(ServiceStore(spec.root), ttl_s=spec.run_lease_ttl_s, run_id=new_run_id(flow_run.get_id()))


@flow(name="process-batch", flow_run_name="batch-{batch_id}")
def process_batch(batch_id: str, spec: ServiceSpec, run_id: str) -> dict[str, Any]:
    """Run one claimed batch, owned by run ``run_id``, to its end; returns the version published (or None) and
    the report URI.

    Each completed step is a Prefect cache entry in ``batches/<id>/steps/`` (``step_cache``); running a batch
    again (after its process was killed) gets the completed steps back as Cached task runs: no second attribution,
    edit or published version. Their wall time was spent by the earlier run, so the timings list them as
    ``<step> (resumed)`` with this run's seconds. Before each step the run checks it still owns the batch
    (``BatchTakenOver`` leaves the batch to its new owner)."""
    store = ServiceStore(spec.root)
    storage = batches_storage(spec.root)  # where the steps' results are cached: one Prefect block save per batch
    timings: dict[str, float] = {}
    state: dict[str, Any] = {"version": None, "gate": None, "shards": None}

    def step(name: str, fn: Any, *args: Any) -> Any:
        check_owner(store, batch_id, run_id)
        t0 = time.perf_counter()
        try:
            done = fn.with_options(**step_cache(storage, batch_id, name))(*args, return_state=True)
        finally:
            timings[name] = round(time.perf_counter() - t0, 2)
        if done.name == "Cached":
            get_run_logger().info("batch %s: %s already done in an earlier run, resuming after it", batch_id, name)
            timings[f"{name} (resumed)"] = timings.pop(name)
        return done.result()

    error = None
    try:
        step("plan", plan_batch_task, spec.root, batch_id, spec.retain_limit, spec.gpus_per_actor, spec.dtype,
             spec.probe_min_confidence, spec.edit_retain_limit)
        state["shards"] = step("attribute", attribute_task, spec.root, batch_id, spec.n_actors, spec.attribution,
                               spec.max_shard, spec.gpus_per_actor, spec.dtype)
        graph_uri = step("reduce", reduce_task, spec.root, batch_id, state["shards"])
        edited = step("edit", edit_task, spec.root, batch_id, graph_uri, spec.method, spec.edit, spec.launcher,
                      spec.ranks, spec.hostfile, spec.ds_profile, spec.edit_timeout_s, spec.version_format)
        state["gate"] = step("evaluate", gate_task, spec.root, batch_id, edited["output_uri"],
                             spec.gate.model_dump(), spec.gpus_per_actor, spec.dtype)
        if state["gate"]["passed"]:
            state["version"] = step("publish", publish_task, spec.root, batch_id, edited["output_uri"], graph_uri)
    except BatchTakenOver:
        raise  # the batch is another run's now: closing it here would race that run
    except Exception as exc:  # noqa: BLE001 - recorded on every request, then re-raised below
        error = f"{next(reversed(timings), 'plan')} step failed: {type(exc).__name__}: {exc}"
        get_run_logger().error("batch %s: %s", batch_id, error)
    check_owner(store, batch_id, run_id)
    if error:
        record_failure(store, batch_id, run_id, error)  # if closing fails too, the next run will not loop on it
    closed = close_task(spec.root, batch_id, state["version"], state["gate"], error, timings, state["shards"],
                        {"launcher": spec.launcher, "n_actors": spec.n_actors},
                        run_id if spec.split_held_back else None)
    if error:
        raise RuntimeError(f"batch {batch_id}: {error}; report {closed['report']}")
    return {"batch_id": batch_id, "version": state["version"], "report": closed["report"], "timings": timings,
            "retry": closed["retry"], "spent": closed.get("spent")}


def process_all(batch_ids: list[str], spec: ServiceSpec, run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Process ``batch_ids`` in turn, and the smaller batches a held-back batch is split into, each on the model
    version the batch before it published; returns ``(results, failed batch ids)``. Once a model's lineage has
    spent what the gate's floors against its registered model allow (``gate.lineage_spent``), its remaining
    batches are split into one-request batches (``when_spent="alone"``) or closed failed unedited (``"close"``)."""
    queue, results, failed = list(batch_ids), [], []
    spent: dict[str, dict[str, Any]] = {}  # target model -> the result of its batch of one that found the floors
    store = ServiceStore(spec.root)
    while queue:
        batch_id = queue.pop(0)
        target = target_of(store, batch_id)
        if target in spent and spec.when_spent == "close":
            results += close_unedited(store, spec, batch_id, run_id, spent[target]["spent"])
            continue
        if target in spent:
            instead = one_by_one(store, batch_id, target, run_id, spent[target]["batch_id"])
            if instead != [batch_id]:  # moved to batches of one, or adopted by another run
                queue = instead + queue
                continue
        state = process_batch(batch_id, spec, run_id, return_state=True)
        if not state.is_completed():
            failed.append(batch_id)
            continue
        results.append(state.result())
        if results[-1]["spent"]:
            get_run_logger().warning("batch %s: %s", batch_id, results[-1]["spent"] if spec.when_spent == "close" else
                                     "one request, held back by the gate's floors against the registered model "
                                     "alone; the model's other requests of this run are edited one at a time")
            spent[target] = results[-1]
        queue = results[-1]["retry"] + queue  # split halves next, before other models' batches
    return results, failed


def one_by_one(store: ServiceStore, batch_id: str, target: str, run_id: str, spent_by: str) -> list[str]:
    """The batches to process instead of a not yet planned ``batch_id``: itself if it holds one request, else
    one-request batches its requests move to; none if another run adopted it (that run processes it).

    Why alone: at the floors, how much an edit costs other people depends on whom it forgets. On the night of 32
    (BENCHMARKS.md section 10) the first request judged alone was held back at 0.595 < 0.600; of the three still
    waiting, each edited alone from that same version, one was published and two held back (0.563, 0.540);
    the batch of two before had cost 0.571."""
    if not _still_owned(store, batch_id, run_id):
        return []
    why = (f"the model's lineage is at the gate's floors against its registered version (batch `{spent_by}`, one "
           "request, was held back by them alone; its report has the figures), so each request is edited alone")
    singles = split_unplanned(store, batch_id, target, run_id, why)
    if not singles:
        return [batch_id]
    get_run_logger().warning("batch %s: the model's lineage is at the gate's floors against its registered "
                             "version; its %d requests are edited one at a time: %s", batch_id, len(singles), singles)
    return singles


def close_unedited(store: ServiceStore, spec: ServiceSpec, batch_id: str, run_id: str, why: str
                   ) -> list[dict[str, Any]]:
    """Close a batch failed without editing it (its model's lineage is spent), if this run still owns it;
    returns its result, or none when another run adopted it (that run closes it, as :func:`process_batch` does)."""
    if not _still_owned(store, batch_id, run_id):
        return []
    closed = close_task(spec.root, batch_id, None, None, why, {})
    return [{"batch_id": batch_id, "version": None, "report": closed["report"], "timings": {}, "retry": [],
             "spent": why}]


def _still_owned(store: ServiceStore, batch_id: str, run_id: str) -> bool:
    """Whether this run still owns ``batch_id`` (else it is logged and left to the run that adopted it)."""
    try:
        check_owner(store, batch_id, run_id)
    except BatchTakenOver as exc:
        get_run_logger().warning("batch %s: %s", batch_id, exc)
        return False
    return True


@flow(name="nightly-unlearning")
def nightly_unlearning(spec: ServiceSpec | None = None) -> list[dict[str, Any]]:
    """Resume the batches whose run died, claim all pending requests (one batch per target model) and process
    each batch."""
    spec = spec or ServiceSpec()
    check_settings(spec)  # a bad setting fails this run before any request is claimed: the requests wait
    with _run_lease(spec) as run:
        batches = claim_pending(spec.root, spec.target_model, spec.max_requests, run.run_id,
                                spec.requests_per_batch)
        results, failed = process_all(batches, spec, run.run_id)
    summarize_task(results, failed)
    if failed:
        raise RuntimeError(f"batches {failed} failed (their requests are marked failed with the reason); "
                           f"{len(results)} completed")
    return results


@flow(name="unlearn-batch")
def unlearn_batch(request_ids: list[str] | None = None, spec: ServiceSpec | None = None,
                  batch_id: str | None = None) -> dict[str, Any]:
    """Run the given pending requests now, as one batch; or, with ``batch_id``, resume a batch whose run was
    killed (its requests still claimed) from its last completed step (refused while its run is alive)."""
    spec = spec or ServiceSpec()
    request_ids = request_ids or None  # the deployment's default is an empty list
    if (request_ids is None) == (batch_id is None):
        raise InputError("unlearn-batch: give request_ids (a new batch) or batch_id (resume one), not both")
    check_settings(spec)
    with _run_lease(spec) as run:
        if batch_id is None:
            batch_id = claim_requests(spec.root, request_ids, run.run_id)
        else:
            adopt_batch(spec.root, batch_id, run.run_id)
        result = process_batch(batch_id, spec, run.run_id)
        retried, failed = process_all(result["retry"], spec, run.run_id)
    summarize_task([result, *retried], failed, key="unlearn-batch")
    if failed:
        raise RuntimeError(f"batches {failed}, split from {batch_id}, failed (their requests are marked failed "
                           "with the reason)")
    return result | {"retried": retried}


@flow(name="submit-request")
def submit_request(request: ForgetRequest, root: str | None = None) -> str:
    """Validate and queue one forget request (the UI renders the form from its schema); returns its id."""
    store = ServiceStore(root or ServiceSpec().root)
    store.check_target(request)
    record = store.submit(request)
    get_run_logger().info("queued %s for %s", record.request.request_id, record.request.target_model)
    return record.request.request_id


def _print_reports(results: list[dict[str, Any]]) -> None:
    from mip_core.storage import filesystem

    if not results:
        print("no pending requests: nothing to do")
    for result in results:
        fs, path = filesystem(result["report"])
        html = result["report"].removesuffix(".md") + ".html"
        print(f"\n{fs.cat_file(path).decode()}\nreport: {result['report']}\n"
              f"HTML report with figures: {html if '://' in html else 'file://' + html}")


if __name__ == "__main__":
    _print_reports(nightly_unlearning())
