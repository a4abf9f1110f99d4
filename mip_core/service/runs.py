"""Which run owns a claimed batch, and how a later run takes over a batch whose run died.

A flow run that processes batches holds a *run lease* (``locks/run-<id>/``) and renews it from a heartbeat
thread while it lives. Claiming writes the owner's run id into the batch's ``claim.json``. A claimed batch whose
owner no longer holds its run lease (no heartbeat for ``ttl_s``: the process was killed, the node lost; or the run
ended without closing the batch) is *orphaned*: the next nightly run adopts it, under the claim lease so that only
one run can, and resumes it after its last completed step. Before each step a run checks that it still owns the
batch: a run presumed dead that wakes up (a long stall) stops without touching the batch again.
"""

from __future__ import annotations

import secrets
import threading
from types import TracebackType
from typing import Any

from mip_core.errors import MipError

from . import lease as leases
from .requests import iso_utc, utc_now
from .store import ServiceStore, check_id


class BatchTakenOver(MipError, RuntimeError):
    """This run no longer owns the batch: another run adopted it after this one stopped renewing its lease."""


def new_run_id(flow_run_id: str | None = None) -> str:
    """``run-<prefect flow run id>`` inside a Prefect run (traceable in the UI), else ``run-<random hex>``."""
    return check_id(f"run-{flow_run_id or secrets.token_hex(8)}", "run id")


class RunLease:
    """``with RunLease(store, ttl_s=600) as run:`` hold ``run.run_id`` alive while the body runs.

    A daemon thread renews the lease every ``ttl_s / 4``; the lease is released on exit, so a batch the run
    leaves claimed (it was interrupted) is adoptable at once instead of after ``ttl_s``.
    """

    def __init__(self, store: ServiceStore, *, ttl_s: float = 600.0, run_id: str | None = None) -> None:
        self.store, self.ttl_s = store, ttl_s
        self.run_id = run_id or new_run_id()
        self._stop = threading.Event()
        self._lease: leases.Lease | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        self._lease = leases.acquire(self.store, self.run_id, ttl_s=self.ttl_s)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                renewed = leases.renew(self.store, self._lease, self.ttl_s) if self._lease else None
            except Exception:  # noqa: BLE001 - a store hiccup: the next beat (ttl/4 later) tries again
                continue
            if renewed is None:  # lost: check_owner stops the run before its next step
                return
            self._lease = renewed

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._lease is not None:
            leases.release(self.store, self._lease)


def _claim_key(store: ServiceStore, batch_id: str) -> str:
    return store.batch_key(batch_id, "claim.json")


def owner_of(store: ServiceStore, batch_id: str) -> str | None:
    """The run id that owns ``batch_id`` (None for a claim written before runs had owners)."""
    return store.read_json(_claim_key(store, batch_id)).get("owner")


def target_of(store: ServiceStore, batch_id: str) -> str:
    """The model a claimed batch edits (from its ``claim.json``)."""
    return str(store.read_json(_claim_key(store, batch_id))["target_model"])


def write_claim(store: ServiceStore, batch_id: str, target_model: str, requests: list[str], owner: str) -> None:
    store.write_json(_claim_key(store, batch_id), {"target_model": target_model, "requests": requests,
                                                   "owner": owner, "claimed_at": iso_utc(utc_now())})


def split_batch(store: ServiceStore, request_ids: list[str], target_model: str, owner: str, parts: int = 2
                ) -> list[str]:
    """Move ``request_ids`` (claimed by one batch that did not finish them) into ``parts`` new batches owned by
    ``owner`` (halves by default, in submission order; 1: one smaller batch); returns the new batch ids. They are
    claimed at once, not put back in the queue, so no other run takes them in between, and a run that dies before
    processing them leaves claimed batches the next run resumes (``claimed_batches``)."""
    if parts < 1 or len(request_ids) < parts:
        raise ValueError(f"split_batch: {request_ids} cannot be split in {parts}")
    size = -(-len(request_ids) // parts)  # ceil: the first parts take the remainder
    new_ids = []
    for part in (request_ids[k:k + size] for k in range(0, len(request_ids), size)):
        new_id = store.new_batch_id()
        write_claim(store, new_id, target_model, part, owner)
        for request_id in part:
            store.move_to_batch(request_id, new_id)
        new_ids.append(new_id)
    return new_ids


def split_unplanned(store: ServiceStore, batch_id: str, target_model: str, owner: str, why: str) -> list[str]:
    """Move the waiting requests of a batch not yet planned into one-request batches owned by ``owner`` and write
    the batch's report (``why``, and where each request went); returns the new batch ids, none for a batch of
    one."""
    from .report import split_unedited_report

    waiting = claimed_batches(store, target_model).get(batch_id, [])
    if len(waiting) < 2:
        return []
    singles = split_batch(store, waiting, target_model, owner, parts=len(waiting))
    records = [store.get(r) for r in waiting]
    store.write_text(store.batch_key(batch_id, "report.md"),
                     split_unedited_report(batch_id, target_model, records, why))
    return singles


def claimed_batches(store: ServiceStore, target_model: str | None = None) -> dict[str, list[str]]:
    """batch id -> its requests still claimed (their batch has not closed them yet)."""
    out: dict[str, list[str]] = {}
    for record in store.list("claimed", target_model=target_model):
        out.setdefault(str(record.batch_id), []).append(record.request_id)
    return out


def batch_owner_state(store: ServiceStore, batch_id: str) -> dict[str, Any]:
    """``{"owner", "alive", "expires_at", "abandon"}``: who runs ``batch_id``, whether that run still holds its
    lease, and why the next run will close it failed instead of resuming it (None: it resumes it)."""
    claim = store.read_json(_claim_key(store, batch_id)) if store.exists(_claim_key(store, batch_id)) else {}
    owner = claim.get("owner")
    live = leases.alive(store, owner) if owner else None
    return {"owner": owner, "alive": live is not None, "expires_at": live.expires_at if live else None,
            "abandon": abandon_reason(claim) if claim else None}


def orphaned_batches(store: ServiceStore, target_model: str | None = None) -> list[str]:
    """Claimed batches whose owning run is gone (oldest first): what the next run should resume."""
    return sorted(b for b in claimed_batches(store, target_model) if not batch_owner_state(store, b)["alive"])


def adopt(store: ServiceStore, batch_id: str, run_id: str) -> dict[str, Any]:
    """Make ``run_id`` the owner of orphaned ``batch_id`` (call under the claim lease); the former owner is kept
    in ``adopted_from`` for the audit trail. Raises :class:`leases.LeaseHeld` if its owner is still alive."""
    check_id(batch_id, "batch_id")
    claim = store.read_json(_claim_key(store, batch_id))
    live = leases.alive(store, claim["owner"]) if claim.get("owner") else None
    if live is not None and claim["owner"] != run_id:
        raise leases.LeaseHeld(f"batch {batch_id} is being processed by run {claim['owner']} (its lease is renewed "
                               f"until {live.expires_at}); wait for it, or, if that process is gone, the batch "
                               "can be resumed once its lease expires")
    claim["adopted_from"] = [*claim.get("adopted_from", []), claim.get("owner")]
    claim["owner"] = run_id
    store.write_json(_claim_key(store, batch_id), claim)
    return claim


MAX_RUNS_PER_BATCH = 3
"""A batch whose runs died this many times (OOM killer, lost node) is closed failed instead of adopted again."""


def record_failure(store: ServiceStore, batch_id: str, run_id: str, error: str) -> None:
    """Append a failed run's error to the batch's ``claim.json``: the audit trail, and what stops a batch that
    fails the same way from being adopted night after night (:func:`abandon_reason`)."""
    claim = store.read_json(_claim_key(store, batch_id))
    claim["errors"] = [*claim.get("errors", []), {"run": run_id, "at": iso_utc(utc_now()), "error": error}]
    store.write_json(_claim_key(store, batch_id), claim)


def _failure_kind(error: str) -> str:
    """``"<step> step failed: <ExceptionType>"``: the same step failing with the same exception type is the
    same failure, whatever paths or times its message carries."""
    return ":".join(error.split(":")[:2])


def abandon_reason(claim: dict[str, Any]) -> str | None:
    """Why an orphaned batch must be closed failed rather than resumed, or None to resume it.

    Resuming helps after a transient failure (a killed process, an S3 outage). A batch whose last two runs failed
    with the same error, or whose runs died ``MAX_RUNS_PER_BATCH`` times, would fail again every night and keep
    its requests ``claimed`` for good."""
    errors = [e["error"] for e in claim.get("errors", [])]
    if len(errors) >= 2 and _failure_kind(errors[-1]) == _failure_kind(errors[-2]):
        return f"failed the same way in {len(errors)} runs: {errors[-1]}"
    runs = len(claim.get("adopted_from", [])) + 1
    if runs >= MAX_RUNS_PER_BATCH:
        last = f"; last error: {errors[-1]}" if errors else ""
        return f"its run stopped before closing it {runs} times (killed or lost){last}"
    return None


def close_unplanned(store: ServiceStore, batch_id: str, reason: str) -> str:
    """Close every still-claimed request of a batch that has no manifest (its plan step failed, or it is
    abandoned before planning) as ``failed`` with ``reason``, and write its report; returns the report's key.

    The manifest is what a normal close reads; without this path a batch whose plan failed kept its requests
    ``claimed`` forever. The request list comes from ``claim.json``, which claiming writes first."""
    from .report import unplanned_report

    claim = store.read_json(_claim_key(store, batch_id))
    report_key = store.batch_key(batch_id, "report.md")
    for request_id in claim["requests"]:
        if store.get(request_id).state == "claimed":
            store.finish(request_id, "failed", reason=reason, report_uri=store.uri(report_key))
    records = [store.get(r) for r in claim["requests"]]
    store.write_text(report_key, unplanned_report(batch_id, claim["target_model"], records, reason))
    return report_key


def check_owner(store: ServiceStore, batch_id: str, run_id: str) -> None:
    """Raise :class:`BatchTakenOver` unless ``run_id`` owns ``batch_id`` and still holds its run lease."""
    owner = owner_of(store, batch_id)
    if owner != run_id:
        raise BatchTakenOver(f"run {run_id} no longer owns batch {batch_id} (run {owner} adopted it after this "
                             "run stopped renewing its lease); this run leaves the batch alone")
    if leases.alive(store, run_id) is None:
        raise BatchTakenOver(f"run {run_id} lost its lease (no heartbeat within its ttl), so batch {batch_id} may "
                             "be adopted by another run at any moment; this run stops, the next one resumes it")


__all__ = ["MAX_RUNS_PER_BATCH", "BatchTakenOver", "RunLease", "abandon_reason", "adopt", "batch_owner_state",
           "check_owner", "claimed_batches", "close_unplanned", "new_run_id", "orphaned_batches", "owner_of",
           "record_failure", "split_batch", "split_unplanned", "target_of", "write_claim"]
