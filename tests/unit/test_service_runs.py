"""Run leases and batch ownership: a live run keeps its batches, a dead run's batches are adoptable, and a run that
lost its batch stops before touching it again. The flow-level proof (a SIGKILLed flow process, then the next
nightly run resumes its batch) is tests/integration/test_service_faults.py."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from mip_core.service import lease as lease_module
from mip_core.service.lease import LeaseHeld, acquire, alive, current, renew
from mip_core.service.requests import ForgetRequest
from mip_core.service.runs import (BatchTakenOver, RunLease, abandon_reason, adopt, batch_owner_state, check_owner,
                                   close_unplanned, orphaned_batches, record_failure, write_claim)
from mip_core.service.store import ServiceStore


class Clock:
    """The leases' clock, moved by the test: expiry is decided by what the test did, never by how long a loaded
    machine took to do it."""

    def __init__(self) -> None:
        self.now = lease_module.utc_now()

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(lease_module, "utc_now", fake)
    return fake


def _claimed_batch(store: ServiceStore, batch_id: str, owner: str, rid: str) -> None:
    store.submit(ForgetRequest(request_id=rid, target_model="m", subjects=["p1"], requester="t", reason="privacy"))
    store.claim([rid], batch_id)
    write_claim(store, batch_id, "m", [rid], owner)


def test_renew_extends_a_held_lease_and_refuses_a_lost_one(tmp_path, clock):
    store = ServiceStore(str(tmp_path))
    lease = acquire(store, "run-x", ttl_s=10, owner="a")
    renewed = renew(store, lease, 60)
    assert renewed is not None and renewed.expires_at > lease.expires_at
    clock.advance(30)
    assert alive(store, "run-x") is not None  # the renewal, not the first ttl, counts
    short = acquire(store, "run-y", ttl_s=10, owner="a")
    clock.advance(11)
    assert alive(store, "run-y") is None and renew(store, short, 60) is None  # expired: lost, not revived
    taken = acquire(store, "run-y", ttl_s=60, owner="b")
    assert renew(store, short, 60) is None and current(store, "run-y") == taken


def _wait_for_renewal(store: ServiceStore, name: str, after: str) -> str:
    """The lease's next expiry once the heartbeat thread (real time, every ttl/4) has renewed it past ``after``."""
    deadline = time.monotonic() + 60
    while (expires := current(store, name).expires_at) <= after:
        assert time.monotonic() < deadline, "the heartbeat did not renew the lease within 60 s"
        time.sleep(0.05)
    return expires


def test_a_run_lease_heartbeats_while_alive_and_is_released_on_exit(tmp_path, clock):
    store = ServiceStore(str(tmp_path))
    with RunLease(store, ttl_s=0.4) as run:  # beats every 0.1 s of real time
        first = expires = current(store, run.run_id).expires_at
        for _ in range(4):  # 4 x 0.3 s = 3 ttls of lease time: without the heartbeat it would have expired
            clock.advance(0.3)
            expires = _wait_for_renewal(store, run.run_id, expires)
        live = alive(store, run.run_id)
        assert live is not None and live.expires_at > first
    assert alive(store, run.run_id) is None and current(store, run.run_id).released_at is not None


def test_only_batches_of_dead_runs_are_orphaned_and_adoptable(tmp_path, clock):
    store = ServiceStore(str(tmp_path))
    with RunLease(store, ttl_s=600) as live:
        _claimed_batch(store, "b-live", live.run_id, "r1")
        dead = acquire(store, "run-dead", ttl_s=60)  # a run killed without releasing: its lease just expires
        _claimed_batch(store, "b-dead", dead.name, "r2")
        with RunLease(store, ttl_s=600) as ended:
            _claimed_batch(store, "b-ended", ended.run_id, "r3")
        clock.advance(61)
        assert orphaned_batches(store) == ["b-dead", "b-ended"]
        assert batch_owner_state(store, "b-live")["alive"]

        with RunLease(store, ttl_s=600) as successor:
            with pytest.raises(LeaseHeld, match=f"batch b-live is being processed by run {live.run_id}"):
                adopt(store, "b-live", successor.run_id)
            claim = adopt(store, "b-dead", successor.run_id)
            assert claim["owner"] == successor.run_id and claim["adopted_from"] == ["run-dead"]
            assert orphaned_batches(store) == ["b-ended"]
            check_owner(store, "b-dead", successor.run_id)  # the new owner may proceed
            with pytest.raises(BatchTakenOver, match="no longer owns batch b-dead"):
                check_owner(store, "b-dead", "run-dead")  # the old one, waking up, may not
        check_owner(store, "b-live", live.run_id)


def test_a_run_whose_own_lease_expired_stops(tmp_path, clock):
    store = ServiceStore(str(tmp_path))
    stalled = acquire(store, "run-stalled", ttl_s=60)
    _claimed_batch(store, "b1", stalled.name, "r1")
    check_owner(store, "b1", "run-stalled")
    clock.advance(61)
    with pytest.raises(BatchTakenOver, match="lost its lease"):
        check_owner(store, "b1", "run-stalled")


def _claim_with(store: ServiceStore, errors: list[str], adopted_from: list[str]) -> dict:
    _claimed_batch(store, "b1", "run-gone", "r1")
    for k, error in enumerate(errors):
        record_failure(store, "b1", f"run-{k}", error)
    claim = store.read_json(store.batch_key("b1", "claim.json"))
    return {**claim, "adopted_from": adopted_from}


def test_a_batch_failing_the_same_way_twice_is_abandoned_not_resumed(tmp_path):
    store = ServiceStore(str(tmp_path))
    same = ["plan step failed: BenchmarkSchemaError: benchmark dir /a does not exist",
            "plan step failed: BenchmarkSchemaError: benchmark dir /b does not exist"]
    reason = abandon_reason(_claim_with(store, same, ["run-0"]))
    assert reason is not None and reason.startswith("failed the same way in 2 runs: plan step failed")
    assert [e["run"] for e in store.read_json(store.batch_key("b1", "claim.json"))["errors"]] == ["run-0", "run-1"]


def test_a_batch_with_one_or_two_different_failures_is_resumed(tmp_path):
    store = ServiceStore(str(tmp_path / "a"))
    assert abandon_reason(_claim_with(store, ["attribute step failed: StoreUnavailable: s3 down"], [])) is None
    store = ServiceStore(str(tmp_path / "b"))
    assert abandon_reason(_claim_with(store, ["attribute step failed: StoreUnavailable: s3 down",
                                              "edit step failed: EditJobError: rank 1 killed"], ["run-0"])) is None


def test_a_batch_whose_runs_died_three_times_is_abandoned(tmp_path):
    store = ServiceStore(str(tmp_path))
    assert abandon_reason(_claim_with(store, [], ["run-0"])) is None
    reason = abandon_reason(_claim_with(ServiceStore(str(tmp_path / "b")), [], ["run-0", "run-1"]))
    assert reason is not None and "3 times" in reason


def test_a_batch_without_a_manifest_closes_every_claimed_request_failed(tmp_path):
    store = ServiceStore(str(tmp_path))
    _claimed_batch(store, "b1", "run-gone", "r1")
    store.submit(ForgetRequest(request_id="r2", target_model="m", subjects=["p2"], requester="t", reason="privacy"))
    store.claim(["r2"], "b1")
    write_claim(store, "b1", "m", ["r1", "r2"], "run-gone")
    key = close_unplanned(store, "b1", "plan step failed: BenchmarkSchemaError: no manifest")
    for rid in ("r1", "r2"):
        record = store.get(rid)
        assert record.state == "failed" and record.reason == "plan step failed: BenchmarkSchemaError: no manifest"
        assert record.report_uri == store.uri(key)
    assert store.list("claimed") == []
    report = store.read_text(key)
    assert "failed before planning" in report and "`r1` | failed" in report and "`r2` | failed" in report
