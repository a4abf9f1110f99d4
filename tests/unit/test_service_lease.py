"""Claim leases: one holder at a time, expiry frees a crashed holder's lease, racers never both win.

The same checks run on a real S3 endpoint in tests/integration/test_service_s3.py (conditional PUT there, a hard
link here).
"""

from __future__ import annotations

import threading
from datetime import datetime

import pytest

from mip_core.service.lease import LeaseHeld, acquire, current, hold, release
from mip_core.service.requests import ForgetRequest
from mip_core.service.store import ServiceStore


def _race(n: int, fn) -> list:
    """Run ``fn(k)`` in ``n`` threads released at the same instant; returns results (or exceptions)."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def run(k: int) -> None:
        barrier.wait()
        try:
            out[k] = fn(k)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each racer got
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def check_lease(store: ServiceStore) -> None:
    first = acquire(store, "claim", owner="run-a")
    assert (first.generation, first.owner) == (1, "run-a")
    with pytest.raises(LeaseHeld, match="held by run-a .*generation 1"):
        acquire(store, "claim", owner="run-b")
    assert release(store, first) and current(store, "claim").released_at is not None
    second = acquire(store, "claim", owner="run-b")
    assert second.generation == 2
    release(store, second)
    # a holder that crashed (never released) blocks only until its expiry. The TTL leaves seconds of margin for
    # the "still held" check on a loaded machine; the taker then waits for the expiry instead of sleeping a guess.
    crashed = acquire(store, "claim", owner="crashed", ttl_s=3.0)
    with pytest.raises(LeaseHeld):
        acquire(store, "claim", owner="run-c")
    taker = acquire(store, "claim", owner="run-c", wait_s=60, poll_s=0.1)
    assert taker.generation == crashed.generation + 1
    assert datetime.fromisoformat(taker.acquired_at) >= datetime.fromisoformat(crashed.expires_at)
    assert not release(store, crashed)  # it lost the lease: releasing must not free the new holder's
    assert current(store, "claim").released_at is None
    release(store, taker)
    # a waiter gets the lease as soon as the holder releases it
    holder = acquire(store, "claim", owner="slow")
    timer = threading.Timer(0.3, release, args=(store, holder))
    timer.start()
    waited = acquire(store, "claim", owner="patient", wait_s=10, ttl_s=5)
    assert waited.owner == "patient" and waited.generation == holder.generation + 1
    release(store, waited)


def check_exclusive_create(store: ServiceStore) -> None:
    wins = _race(8, lambda k: store.create_bytes("locks/x/0000000001.json", f"{k}".encode()))
    assert sorted(wins) == [False] * 7 + [True]
    assert store.read_text("locks/x/0000000001.json") == str(wins.index(True))  # the winner's bytes, whole


def check_racing_claimers(store: ServiceStore, n_runs: int = 4, n_requests: int = 12) -> None:
    """``n_runs`` nightly runs claim at once: each pending request ends in exactly one batch."""
    for k in range(n_requests):
        store.submit(ForgetRequest(request_id=f"q{k:02d}", target_model="demo", subjects=["p0001"],
                                   requester="t", reason="privacy"))

    def claimer(k: int) -> list[str]:
        with hold(store, "claim", owner=f"run-{k}", wait_s=30):
            ids = [r.request_id for r in store.list("pending")]
            return [r.request_id for r in store.claim(ids, f"batch-{k}")]

    results = _race(n_runs, claimer)
    assert not any(isinstance(r, Exception) for r in results), results
    claimed = [rid for r in results for rid in r]
    assert sorted(claimed) == [f"q{k:02d}" for k in range(n_requests)]  # every one, none twice
    batches = {r.request_id: r.batch_id for r in store.list("claimed")}
    assert len(batches) == n_requests
    for k, ids in enumerate(results):
        assert all(batches[rid] == f"batch-{k}" for rid in ids)


def test_lease_local(tmp_path):
    check_lease(ServiceStore(str(tmp_path / "store")))


def test_exclusive_create_local(tmp_path):
    check_exclusive_create(ServiceStore(str(tmp_path / "store")))


def test_racing_claimers_local(tmp_path):
    check_racing_claimers(ServiceStore(str(tmp_path / "store")))


def test_old_generations_are_pruned(tmp_path):
    store = ServiceStore(str(tmp_path / "store"))
    for _ in range(12):
        release(store, acquire(store, "claim"))
    left = sorted(p.name for p in (tmp_path / "store" / "locks" / "claim").glob("*.json"))
    assert len(left) == 8 and left[-1] == "0000000012.json"


def test_lease_names_are_ids(tmp_path):
    with pytest.raises(ValueError, match="lease name"):
        acquire(ServiceStore(str(tmp_path)), "../claim")
