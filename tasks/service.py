"""Prefect tasks of the unlearning service: each loads by storage key, calls ``mip_core``, writes, returns a key.

Tasks hand each other storage keys and URIs, never tensors or models, so any step can be rerun from what is in
storage. Retries sit on the decorators: I/O-bound steps retry; the attribution and the edit job retry once
(a lost Ray node or a crashed rank), evaluation and publication are cheap to redo.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.filesystems import RemoteFileSystem
from prefect.states import Crashed

from mip_core.benchmark import load_benchmark
from mip_core.benchmark.schema import BenchmarkError
from mip_core.entrypoints.edit import EditSpec
from mip_core.entrypoints.edit_plan import validate_edit_plan
from mip_core.errors import InputError, ModelLoadError
from mip_core.modeling.io import localize
from mip_core.path_graph import reduce_paths
from mip_core.parquet_io import read_item_paths, read_path_graph, write_path_graph
from mip_core.service.batch import BatchManifest, plan_batch, unknown_versions
from mip_core.service.gate import GateConfig, format_decision, lineage_spent
from mip_core.service.lease import LeaseHeld, hold
from mip_core.service.forgotten import asked_elsewhere, forgotten_before
from mip_core.service.planning import plan_people_batch
from mip_core.service.probes import MIN_CONFIDENCE
from mip_core.service.html_report import batch_html
from mip_core.service.links import report_link
from mip_core.service.report import batch_report
from mip_core.service.runs import (abandon_reason, adopt, claimed_batches, close_unplanned, orphaned_batches,
                                   split_batch, write_claim)
from mip_core.service.scores import promote_scores
from mip_core.service.store import ServiceStore
from mip_core.storage import storage_options
from tasks.actors import attribute_batch, attribution_config
from tasks.gate import gate_batch, probe_on_actor
from tasks.launch import launch_edit
from tasks.logs import forward_progress


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: retry I/O and infrastructure failures, not bad input or a bug (a retry cannot fix them)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (InputError, BenchmarkError, ModelLoadError, TypeError, AttributeError, NameError,
                                KeyError))


# I/O-bound steps retry twice with backoff; attribution and the edit job (minutes of compute) once. NO_CACHE here:
# claiming and closing must run every time; a batch's steps are cached per batch by ``step_cache`` in the flow.
IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [5, 30], "cache_policy": NO_CACHE,
                              "retry_condition_fn": transient}
COMPUTE_RETRIES: dict[str, Any] = {"retries": 1, "retry_delay_seconds": 10, "cache_policy": NO_CACHE,
                                   "retry_condition_fn": transient}


# Claiming is seconds of listing and renaming: a 10-minute lease outlives any claim, and a second run waits up
# to 2 minutes for the first run's claim to finish before giving up with the holder's name. An object-store lease,
# not Prefect's transaction locks (in one process, on one disk, or in Redis) nor its concurrency limits (in its
# database): two workers on two machines, or on two Prefect servers, must still never claim the same request.
CLAIM_LEASE, CLAIM_TTL_S, CLAIM_WAIT_S = "claim", 600.0, 120.0


def manifest_of(store: ServiceStore, batch_id: str) -> BatchManifest:
    return BatchManifest.from_json(store.read_text(store.batch_key(batch_id, "manifest.json")))


@task(name="claim-pending", **IO_RETRIES)
def claim_pending(root: str, target_model: str | None, max_requests: int, run_id: str,
                  requests_per_batch: int | None = None) -> list[str]:
    """Adopt the batches whose run died (oldest first), then claim the pending requests (at most ``max_requests``
    per target model, in submission order), in batches of ``requests_per_batch`` (None: one batch per model);
    returns the batch ids, all now owned by ``run_id``. The run processes them in turn, each on the version the
    one before published, so claiming them all now keeps another run from taking tonight's queue in between."""
    store = ServiceStore(root)
    batches = []
    dead_runs: dict[str, str | None] = {}  # adopted batch -> the run that died holding it
    abandoned: dict[str, str] = {}  # batch -> why it is closed failed instead of resumed
    with hold(store, CLAIM_LEASE, ttl_s=CLAIM_TTL_S, wait_s=CLAIM_WAIT_S):  # one claimer at a time
        for batch_id in orphaned_batches(store, target_model):
            reason = abandon_reason(store.read_json(store.batch_key(batch_id, "claim.json")))
            if reason is not None:  # resuming it would fail again: close it, every night would loop
                abandoned[batch_id] = f"batch abandoned: {reason}"
                continue
            dead_runs[batch_id] = adopt(store, batch_id, run_id)["adopted_from"][-1]
            get_run_logger().warning("batch %s: its run %s is gone; resuming it after its last completed step",
                                     batch_id, dead_runs[batch_id])
            batches.append(batch_id)
        by_model: dict[str, list[str]] = {}
        for rec in store.list("pending", target_model=target_model):
            by_model.setdefault(rec.request.target_model, []).append(rec.request.request_id)
        for model, ids in sorted(by_model.items()):
            ids = ids[:max_requests]
            size = requests_per_batch or len(ids)
            for start in range(0, len(ids), size):
                batch_id = store.new_batch_id()
                claimed = store.claim(ids[start:start + size], batch_id)
                if claimed:
                    write_claim(store, batch_id, model, [r.request.request_id for r in claimed], run_id)
                    batches.append(batch_id)
    for batch_id, dead_run in dead_runs.items():  # Prefect API calls: after the claim lease, not under it
        mark_crashed(dead_run, batch_id, run_id)
    for batch_id, reason in abandoned.items():
        get_run_logger().error("batch %s: %s; its requests are closed failed", batch_id, reason)
        try:
            close_task.fn(root, batch_id, None, None, reason, {})
        except Exception as exc:  # noqa: BLE001 - one broken batch must not hold up tonight's new requests
            get_run_logger().error("batch %s could not be closed (%s: %s); `mip status` lists it", batch_id,
                                   type(exc).__name__, exc)
    get_run_logger().info("claimed %d batch(es): %s", len(batches), batches)
    return batches


@task(name="adopt-batch", **IO_RETRIES)
def adopt_batch(root: str, batch_id: str, run_id: str) -> str:
    """Take over a batch whose run is gone (refused while its run still renews its lease); returns its id."""
    store = ServiceStore(root)
    with hold(store, CLAIM_LEASE, ttl_s=CLAIM_TTL_S, wait_s=CLAIM_WAIT_S):
        if batch_id not in claimed_batches(store):
            raise InputError(f"batch_id={batch_id!r} has no claimed requests: it finished (see `mip report "
                             f"{batch_id}`) or never existed; nothing to resume")
        try:
            claim = adopt(store, batch_id, run_id)
        except LeaseHeld as exc:
            raise InputError(f"batch_id={batch_id!r}: {exc}") from None
    mark_crashed(claim["adopted_from"][-1], batch_id, run_id)
    return batch_id


def mark_crashed(dead_run: str | None, batch_id: str, successor: str) -> None:
    """A killed process reports nothing, so its Prefect flow runs (and their subflow runs) still say Running: mark
    them Crashed, naming the run that resumed the batch, so the UI tells the truth. Best effort: the batch is
    resumed either way.

    Kept beside Prefect's zombie detection (flow-run heartbeat events and an automation the server must be given):
    that marks a run Crashed only minutes after its last heartbeat and where the automation exists, and cannot say
    which run took the batch over; this marks it when the batch is adopted."""
    flow_run_id = (dead_run or "").removeprefix("run-")
    try:
        uuid.UUID(flow_run_id)
    except ValueError:
        return  # a run outside Prefect (no flow run to mark)
    message = f"its process stopped renewing its lease; batch {batch_id} was resumed by {successor}"
    try:
        with get_client(sync_client=True) as client:
            children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(flow_run_id)]))
            for run in [client.read_flow_run(flow_run_id), *client.read_flow_runs(flow_run_filter=children)]:
                if run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    except Exception as exc:  # noqa: BLE001 - e.g. the dead run was on another Prefect server
        get_run_logger().warning("could not mark flow run %s crashed: %s", flow_run_id, exc)


def step_cache(storage: Path | RemoteFileSystem, batch_id: str, step: str) -> dict[str, Any]:
    """Task options that make a batch step a Prefect cache entry keyed on (batch, step), its result record at
    ``batches/<id>/steps/<step>.json`` in the store: a run that resumes a killed run's batch gets each finished
    step back as a Cached task run instead of attributing, editing or publishing again.

    The record lives with the batch, not in Prefect's database: Prefect's cache lookup reads only the result
    storage, so a fresh Prefect server resumes the batch too. A record Prefect cannot read (cut short by a kill,
    the store down at that moment) counts as absent and the step runs again; publishing finds the batch's own
    version, so a batch still gets one. Not for claiming or closing: those must run every time (``NO_CACHE``).
    ``storage`` is :func:`batches_storage` of the store, made once per batch."""
    key = f"{batch_id}/steps/{step}.json"
    return {"cache_policy": CacheKeyFnPolicy(cache_key_fn=lambda *_: key), "result_storage": storage,
            "result_serializer": "json", "persist_result": True, "refresh_cache": False}


def batches_storage(root: str) -> Path | RemoteFileSystem:
    """Prefect result storage at the store's ``batches/`` folder. Prefect takes a remote storage block only once
    saved on its server, so an S3 store's block is saved again by every batch that runs (one name per store,
    overwritten): a fresh Prefect database gets it back, and the records themselves stay in the store."""
    store = ServiceStore(root)
    if not store.remote:
        return Path(store.uri("batches"))
    block = RemoteFileSystem(basepath=store.uri("batches"), settings=storage_options(store.root, store.endpoint_url))
    block.save(f"mip-batches-{hashlib.sha256(store.root.encode()).hexdigest()[:16]}", overwrite=True)
    return block


@task(name="check-settings", cache_policy=NO_CACHE)
def check_settings(spec: Any) -> dict[str, Any]:
    """Check a run's settings before it claims anything: edit overrides, the RMisU batch against the edit job's
    ranks, the DeepSpeed profile against the launcher and this machine, the attribution overrides. A bad setting
    is the operator's to fix: it fails the run (an InputError, not retried) and leaves every request pending."""
    plan = validate_edit_plan(spec.method, spec.edit, launcher=spec.launcher, ranks=spec.ranks,
                              hostfile=spec.hostfile, ds_profile=spec.ds_profile)
    attribution_config(spec.attribution)
    return plan.model_dump(exclude={"ds_config"})


@task(name="claim-requests", **IO_RETRIES)
def claim_requests(root: str, request_ids: list[str], run_id: str) -> str:
    """Claim the given pending requests (one target model) as a new batch owned by ``run_id``; returns its id."""
    store = ServiceStore(root)
    with hold(store, CLAIM_LEASE, ttl_s=CLAIM_TTL_S, wait_s=CLAIM_WAIT_S):
        records = [store.get(r) for r in request_ids]
        not_pending = [r.request.request_id for r in records if r.state != "pending"]
        models = sorted({r.request.target_model for r in records})
        if not_pending or len(models) != 1:
            raise InputError(f"request_ids: {not_pending} are not pending (`mip status ID` shows where they are)"
                             if not_pending else f"request_ids: the requests target several models {models}; "
                             "run one batch per model")
        batch_id = store.new_batch_id()
        store.claim(request_ids, batch_id)
        write_claim(store, batch_id, models[0], request_ids, run_id)
    return batch_id


@task(name="plan-batch", **COMPUTE_RETRIES)
def plan_batch_task(root: str, batch_id: str, retain_limit: int, gpus_per_actor: int = 1, dtype: str = "auto",
                    min_confidence: float = MIN_CONFIDENCE, edit_retain_limit: int | None = None) -> str:
    """Turn the claimed requests into the batch's items; unresolvable ones are rejected now, with why.

    A model registered with keep-sets: each person is probed with the model's templates on a Ray actor (the
    model answers; confident answers are kept) and the batch gets its own item table. A model registered with
    its benchmark: subjects are its profile ids, resolved against it."""
    store = ServiceStore(root)
    claim = store.read_json(store.batch_key(batch_id, "claim.json"))
    info = store.model_info(claim["target_model"])
    records = [store.get(r) for r in claim["requests"]]
    base_uri = store.uri(store.model_key(claim["target_model"], info["version"]))
    common = {"target_model": claim["target_model"], "base_version": info["version"], "base_uri": base_uri,
              "retain_limit": retain_limit, "edit_retain_limit": edit_retain_limit}
    versions = store.versions(claim["target_model"])
    forgotten = forgotten_before(store, claim["target_model"], info["version"])
    asked = asked_elsewhere(store, claim["target_model"], claim["requests"])
    get_run_logger().info("plan: earlier versions forgot %d request(s) in %d batch(es); their people leave the "
                          "kept sets and a sample of their items is re-checked by the gate",
                          len(forgotten.requests), len(forgotten.batches))
    if info.get("keepsets"):
        def answer(table_uri: str, ids: Sequence[str]) -> dict[str, tuple[str, float]]:
            return probe_on_actor(base_uri, table_uri, ids, gpus_per_actor=gpus_per_actor, dtype=dtype,
                                  endpoint_url=store.endpoint_url, log=get_run_logger().info)

        requests = [r.request for r in records]
        manifest = plan_people_batch(store, batch_id, requests, info["keepsets"], answer,
                                     rejected=unknown_versions(requests, claim["target_model"], versions),
                                     min_confidence=min_confidence, forgotten=forgotten, asked=asked,
                                     log=get_run_logger().info, **common)
    else:
        bench = load_benchmark(localize(info["dataset_uri"]))
        manifest = plan_batch(batch_id, records, dataset_uri=info["dataset_uri"], bench=bench, versions=versions,
                              forgotten=[(i, r) for i, r, _ in forgotten.items], asked=asked, **common)
    key = store.batch_key(batch_id, "manifest.json")
    store.write_text(key, manifest.to_json())
    for request_id, reason in manifest.rejected.items():  # the batch's report will list them too
        store.finish(request_id, "rejected", reason=reason,
                     report_uri=store.uri(store.batch_key(batch_id, "report.md")))
    get_run_logger().info("batch %s: %d requests, %d rejected, %d forget items", batch_id, len(manifest.requests),
                          len(manifest.rejected), len(manifest.forget))
    return key


@task(name="attribute-shards", **COMPUTE_RETRIES)
def attribute_task(root: str, batch_id: str, n_actors: int, attribution: dict[str, Any],
                   max_shard: int | None, gpus_per_actor: int = 1, dtype: str = "auto") -> list[dict[str, Any]]:
    """Score the forget items on Ray actors (``gpus_per_actor`` GPUs each on a GPU cluster, the model in
    ``dtype``); each shard's paths land as Parquet under ``shards/``."""
    store = ServiceStore(root)
    m = manifest_of(store, batch_id)
    attribution_config(attribution)  # a bad key fails here, before any actor starts
    results = attribute_batch(m.base_uri, m.dataset_uri, list(m.forget),
                              store.uri(store.batch_key(batch_id, "shards")), run_id=batch_id, n_actors=n_actors,
                              attribution_cfg=attribution, max_shard=max_shard, gpus_per_actor=gpus_per_actor,
                              dtype=dtype, log=get_run_logger().info)
    out = [r.to_dict() for r in results]
    store.write_json(store.batch_key(batch_id, "shards.json"), out)
    return out


@task(name="reduce-paths", **IO_RETRIES)
def reduce_task(root: str, batch_id: str, shards: list[dict[str, Any]]) -> str:
    """Reduce the shards' per-item paths into the batch's global path graph (Parquet); returns its URI."""
    store = ServiceStore(root)
    graph = reduce_paths(read_item_paths([s["uri"] for s in shards]), run_id=batch_id)
    uri = store.uri(store.batch_key(batch_id, "path_graph"))
    write_path_graph(graph, uri)
    get_run_logger().info("path graph %s: %d neurons over %d requests", uri, len(graph), len(graph.requests()))
    return uri


@task(name="edit-model", **COMPUTE_RETRIES)
def edit_task(root: str, batch_id: str, graph_uri: str, method: str, edit: dict[str, Any], launcher: str,
              ranks: int, hostfile: str | None, ds_profile: str = "auto", timeout_s: float = 1800,
              version_format: str = "delta") -> dict[str, Any]:
    """Launch the edit job (DeepSpeed ZeRO-3 with the ``ds_profile`` config, torchrun or in-process), stopped
    after ``timeout_s``; returns its summary."""
    store = ServiceStore(root)
    m = manifest_of(store, batch_id)
    spec = EditSpec(model_uri=m.base_uri, bench_uri=m.dataset_uri, forget=[list(p) for p in m.forget],
                    retain_item_ids=list(m.edit_retain), earlier=[list(p) for p in m.eval_earlier],
                    graph_uri=graph_uri,
                    output_uri=store.uri(store.batch_key(batch_id, "edited")), method=method, edit=edit,
                    lineage={"batch_id": batch_id, "base_version": m.base_version, "path_graph": graph_uri,
                             "requests": m.accepted}, version_format=version_format)
    with forward_progress():  # in-process edits log here; a DeepSpeed job's lines are relayed from its log
        summary = launch_edit(spec, store.uri(store.batch_key(batch_id, "edit_config.json")),
                              store.uri(store.batch_key(batch_id, "logs", "edit.log")), launcher=launcher,
                              n_ranks=ranks, hostfile=hostfile, ds_profile=ds_profile, timeout_s=timeout_s,
                              relay=get_run_logger().info)
    store.write_json(store.batch_key(batch_id, "edit_summary.json"), summary)
    return summary


@task(name="evaluate-gate", **COMPUTE_RETRIES)
def gate_task(root: str, batch_id: str, edited_uri: str, gate: dict[str, float], gpus_per_actor: int = 1,
              dtype: str = "auto") -> dict[str, Any]:
    """Score forget / retain / utility items before and after the edit, per modality, and apply the gate. Models
    are scored on Ray actors (none is loaded here); the starting version's scores come from its cache."""
    store = ServiceStore(root)
    decision = gate_batch(store, batch_id, edited_uri, GateConfig(**gate), gpus_per_actor=gpus_per_actor,
                          dtype=dtype, log=get_run_logger().info)
    get_run_logger().info("gate of batch %s:\n%s", batch_id, format_decision(decision))
    store.write_json(store.batch_key(batch_id, "gate.json"), decision.to_dict())
    return decision.to_dict()


@task(name="publish", **IO_RETRIES)
def publish_task(root: str, batch_id: str, edited_uri: str, graph_uri: str) -> str:
    """Copy the gated model to ``models/<name>/<version>/`` with its lineage and move the pointer to it."""
    store = ServiceStore(root)
    m = manifest_of(store, batch_id)
    existing = store.version_of_batch(m.target_model, batch_id)  # a re-run after a crash mid-publish
    if existing is not None:
        if store.current_version(m.target_model) != existing:
            store.set_current(m.target_model, existing)
        promote_scores(store, batch_id, m.target_model, existing)
        get_run_logger().info("batch %s was already published as %s", batch_id, existing)
        return existing
    base = store.model_info(m.target_model, m.base_version)  # the new version keeps its base's keep-sets
    version = store.register_model(
        m.target_model, edited_uri, dataset_uri=base.get("dataset_uri"), keepsets=base.get("keepsets"),
        card=f"# {m.target_model}\n\nEdited by MIP-Editor batch `{batch_id}` from version `{m.base_version}`: "
             f"{len(m.accepted)} forget request(s), {len(m.forget)} items. Lineage in lineage.json.\n",
        lineage={"parent_version": m.base_version, "batch_id": batch_id, "requests": m.accepted,
                 "path_graph": graph_uri})
    get_run_logger().info("published %s %s (files: %s; links and server-side copies move no bytes through this "
                          "worker)", m.target_model, version, store.model_info(m.target_model, version).get("copied"))
    promote_scores(store, batch_id, m.target_model, version)  # the next gate scores one model, not two
    return version


@task(name="close-batch", **IO_RETRIES)
def close_task(root: str, batch_id: str, version: str | None, gate: dict[str, Any] | None, error: str | None,
               timings: dict[str, float], shards: list[dict[str, Any]] | None = None,
               resources: dict[str, Any] | None = None, split_for: str | None = None) -> dict[str, Any]:
    """Give every claimed request its terminal record, write the reports (markdown and HTML), attach them to the
    run; returns ``{"report": the markdown report's URI, "retry": new batch ids, "target_model", "spent": why the
    model's lineage takes no more edits this run, or None}`` (``gate.lineage_spent``).

    With ``split_for`` (the run id), no request fails only because it shared a batch: a held-back batch of
    several requests moves them into two smaller batches owned by that run (``retry``), and a published one moves
    the requests it did not make forgotten into one (``_retry_batches``). A request judged alone that does not
    pass fails with its own figures."""
    store = ServiceStore(root)
    if not store.exists(store.batch_key(batch_id, "manifest.json")):  # the plan step failed: no items, no gate
        report_key = close_unplanned(store, batch_id, error or "the batch was closed before it was planned")
        create_markdown_artifact(markdown=store.read_text(report_key), key=_artifact_key(batch_id),
                                 description=f"MIP-Editor batch {batch_id}")
        return {"report": store.uri(report_key), "retry": [], "spent": None}
    m = manifest_of(store, batch_id)
    report_key = store.batch_key(batch_id, "report.md")
    failed_items = {i for s in (shards or []) for i, _ in s.get("failures", [])}
    per_request = (gate or {}).get("per_request", {})
    # not closed by an earlier, interrupted run of this batch, nor moved on to a smaller batch by it
    open_ids = [r for r in m.accepted if (rec := store.get(r)).state == "claimed" and rec.batch_id == batch_id]
    n_ok = {r: sum(1 for i in m.items_of.get(r, ()) if i not in failed_items) for r in open_ids}
    retry, moved = _retry_batches(store, m, gate, version, error, [r for r in open_ids if n_ok[r]], split_for)
    for request_id in (r for r in open_ids if r not in moved):
        own = (gate or {}).get("request_reasons", {}).get(request_id)  # its own items not forgotten
        if version and n_ok[request_id] and own is None:
            store.finish(request_id, "done", model_version=version, report_uri=store.uri(report_key),
                         metrics=per_request.get(request_id))
        else:
            if error:
                reason = error
            elif not n_ok[request_id]:
                reason = "attribution failed for every item of the request"
            elif gate:  # its own figures first; the batch's reasons when nothing was published
                batch_reasons = [] if version else [r for r in gate["reasons"] if not own or own not in r]
                parts = ([own] if own else []) + batch_reasons
                reason = "gate: " + "; ".join(parts) + (f" (version {version} was published for the batch's other "
                                                        "requests)" if version else "")
            else:
                reason = "not published"
            store.finish(request_id, "failed", reason=reason, report_uri=store.uri(report_key),
                         metrics=per_request.get(request_id))
    records = [store.get(r) for r in m.requests]
    links = {k: store.uri(store.batch_key(batch_id, k)) for k in ("manifest.json", "path_graph", "logs/edit.log")}
    text = batch_report(m, records, gate=gate, version=version, error=error, timings=timings, shards=shards,
                        links=links)
    store.write_text(report_key, text)
    store.write_json(store.batch_key(batch_id, "timings.json"), timings)
    artifact_key = _artifact_key(batch_id)
    html_uri = write_html_report(store, m, records, get_run_logger(), gate=gate, version=version, error=error,
                                 timings=timings, shards=shards, resources=resources, links=links)
    link = report_link(store, batch_id) if html_uri else None
    create_markdown_artifact(markdown=text + (f"\n[HTML report with figures]({link.url}) ({link.how})\n"
                                              if link else ""),
                             key=artifact_key, description=f"MIP-Editor batch {batch_id}")
    if link:
        create_link_artifact(link=link.url, key=f"{artifact_key}-html", link_text=f"report.html ({batch_id})",
                             description=f"MIP-Editor batch {batch_id}: HTML report, {link.how}")
    return {"report": store.uri(report_key), "retry": retry, "target_model": m.target_model,
            "spent": None if error else lineage_spent(gate, len(m.accepted))}


def _retry_batches(store: ServiceStore, m: BatchManifest, gate: dict[str, Any] | None, version: str | None,
                   error: str | None, attributed: list[str], split_for: str | None) -> tuple[list[str], set[str]]:
    """``(the smaller batches requests of this batch move to, the requests moved)`` (see ``close_task``).

    A request fails only once it was judged alone. With ``split_for``, a batch of several requests that the gate
    held back moves all of them into two halves (the requests that did not forget too: with fewer people the same
    edit budget may be enough); a published batch moves those whose own items were not forgotten into one smaller
    batch on the new version. Each retry is smaller than its batch, so a night ends with every request done or
    judged alone. ``attributed``: the batch's open requests with at least one attributed item."""
    if not split_for or error or not gate or len(attributed) < 2:
        return [], set()
    if version:  # published: the requests that did not forget theirs, retried without the others
        movable = [r for r in attributed if r in gate.get("request_reasons", {})]
        why, parts = f"published as {version}, but not their own people", 1
    else:
        movable, why, parts = attributed, "held back (" + "; ".join(gate.get("reasons", [])) + ")", 2
    if not movable:
        return [], set()
    retry = split_batch(store, movable, m.target_model, split_for, parts)
    get_run_logger().warning("batch %s: %s; %d of its requests are retried in smaller batches %s", m.batch_id, why,
                             len(movable), retry)
    return retry, set(movable)


def _artifact_key(batch_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"batch-{batch_id.lower()}".replace("_", "-")


def write_html_report(store: ServiceStore, m: BatchManifest, records: list[Any], logger: Any,
                      **report: Any) -> str | None:
    """``report.html`` beside the markdown report; its URI, or None if it could not be drawn. The figures are for
    people: a plotting failure is logged, and never fails a batch whose requests are already closed."""
    graph_key, edit_key = store.batch_key(m.batch_id, "path_graph"), store.batch_key(m.batch_id, "edit_summary.json")
    try:
        graph = read_path_graph(store.uri(graph_key), store.endpoint_url) if store.exists(graph_key) else None
        edit = store.read_json(edit_key) if store.exists(edit_key) else None
        uri = store.uri(store.batch_key(m.batch_id, "report.html"))
        store.write_text(store.batch_key(m.batch_id, "report.html"),
                         batch_html(m, records, graph=graph, edit=edit, **report))
    except Exception as exc:  # noqa: BLE001 - see the docstring; the markdown report stands
        logger.error("batch %s: the HTML report could not be written: %s: %s", m.batch_id, type(exc).__name__, exc)
        return None
    logger.info("batch %s report: %s", m.batch_id, uri)
    return uri


def _held_back(retry: list[str]) -> str:
    return "no, retried as " + " and ".join(f"`{b}`" for b in retry) if retry else "no (see report)"


@task(name="summarize-run", **IO_RETRIES)
def summarize_task(results: list[dict[str, Any]], failed: list[str], key: str = "nightly-unlearning") -> str:
    """One markdown artifact per run (``key``: nightly-unlearning, unlearn-batch): every batch, what it
    published, and where its reports are."""
    title = "Nightly unlearning run" if key == "nightly-unlearning" else "Unlearning batch run"
    lines = [f"# {title}", "", "| batch | published | report |", "|---|---|---|"]
    lines += [f"| `{r['batch_id']}` | {r['version'] or _held_back(r.get('retry', []))} | `{r['report']}` (figures: "
              f"`{r['report'].removesuffix('.md')}.html`) |" for r in results]
    lines += [f"| `{b}` | failed | see the batch's run and `batches/{b}/report.md` |" for b in failed]
    if not results and not failed:
        lines.append("| - | no pending requests | - |")
    text = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown=text, key=key, description="batches of this run")
    return text
