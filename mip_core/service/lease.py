"""Leases with expiry in the service store: at most one holder at a time, and a crashed holder does not block
the next one forever.

Why generations and not one lock file: breaking an expired lock by "delete, then create" races (two breakers both
delete, and the second deletes the first's fresh lock). Here every taking of the lease creates a *new* object,
``locks/<name>/<generation>.json``, with an exclusive create (``ServiceStore.create_bytes``: a hard link locally,
``If-None-Match: *`` on S3). The holder is the highest generation; taking over an expired or released lease
means creating generation + 1, which exactly one of several racers can do. Nothing is ever deleted to take a
lease, so a slow former holder cannot remove its successor's.

A lease protects a short critical section (claiming requests), or, renewed by a heartbeat (``renew``), a long
one (a run processing batches, see ``runs``); its ``ttl_s`` is the longest the holder may stay silent. A holder
past its expiry has lost the lease: ``release`` and ``renew`` then report it instead of pretending.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta

from mip_core.errors import MipError

from .requests import iso_utc, utc_now
from .store import ServiceStore, check_id

_KEEP_GENERATIONS = 8  # older lease files are pruned: the last few stay for the audit trail


class LeaseHeld(MipError, RuntimeError):
    """Another holder has the lease and it has not expired."""


@dataclass(frozen=True)
class Lease:
    name: str
    generation: int
    owner: str
    acquired_at: str
    expires_at: str
    released_at: str | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return _parse(self.expires_at) <= (now or utc_now())


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _key(name: str, generation: int | None = None) -> str:
    check_id(name, "lease name")
    return f"locks/{name}" if generation is None else f"locks/{name}/{generation:010d}.json"


def current(store: ServiceStore, name: str) -> Lease | None:
    """The latest lease record of ``name`` (held, expired or released), or None if it was never taken."""
    stems = (p.rsplit("/", 1)[-1].removesuffix(".json") for p in store._list(_key(name)) if p.endswith(".json"))
    generations = [int(stem) for stem in stems if stem.isdigit()]
    return Lease(**store.read_json(_key(name, max(generations)))) if generations else None


def acquire(store: ServiceStore, name: str, *, ttl_s: float = 600.0, owner: str | None = None,
            wait_s: float = 0.0, poll_s: float = 0.5) -> Lease:
    """Take lease ``name`` for ``ttl_s`` seconds, waiting up to ``wait_s`` for a live holder to finish.

    Raises :class:`LeaseHeld` (naming the holder and its expiry) if it is still held after ``wait_s``.
    """
    if ttl_s <= 0:
        raise ValueError(f"ttl_s={ttl_s!r} must be positive")
    owner = owner or default_owner()
    deadline = time.monotonic() + wait_s
    while True:
        latest = current(store, name)
        now = utc_now()
        if latest is None or latest.released_at is not None or latest.expired(now):
            generation = 1 if latest is None else latest.generation + 1
            lease = Lease(name, generation, owner, iso_utc(now), iso_utc(now + timedelta(seconds=ttl_s)))
            if store.create_bytes(_key(name, generation), json.dumps(asdict(lease), indent=1).encode()):
                if generation > _KEEP_GENERATIONS:
                    store.delete(_key(name, generation - _KEEP_GENERATIONS))
                return lease
            continue  # another taker won this generation: look again
        if time.monotonic() >= deadline:
            raise LeaseHeld(f"lease {name!r} is held by {latest.owner} (generation {latest.generation}) until "
                            f"{latest.expires_at}; another run is claiming now: wait for it, or if that process "
                            f"is gone, the lease frees itself at its expiry ({store.uri(_key(name))})")
        time.sleep(poll_s)


def release(store: ServiceStore, lease: Lease) -> bool:
    """Mark ``lease`` released; False (and nothing written) if it had expired and someone else took it over."""
    latest = current(store, lease.name)
    if latest is None or latest.generation != lease.generation:
        return False
    store.write_json(_key(lease.name, lease.generation), asdict(lease) | {"released_at": iso_utc(utc_now())})
    return True


def renew(store: ServiceStore, lease: Lease, ttl_s: float) -> Lease | None:
    """Extend a held lease to ``ttl_s`` from now (a heartbeat); None if it was lost (expired, taken, released).

    Only the holder's own generation file is rewritten, so a renewal racing a takeover can at worst rewrite a
    superseded generation, which no one reads as the holder any more.
    """
    latest = alive(store, lease.name)
    if latest is None or latest.generation != lease.generation:
        return None
    renewed = replace(lease, expires_at=iso_utc(utc_now() + timedelta(seconds=ttl_s)))
    store.write_json(_key(lease.name, lease.generation), asdict(renewed))
    return renewed


def alive(store: ServiceStore, name: str) -> Lease | None:
    """The lease record of ``name`` if someone holds it now (taken, not released, not expired), else None."""
    latest = current(store, name)
    return latest if latest is not None and latest.released_at is None and not latest.expired() else None


@contextmanager
def hold(store: ServiceStore, name: str, *, ttl_s: float = 600.0, wait_s: float = 0.0,
         owner: str | None = None) -> Iterator[Lease]:
    """``with hold(store, "claim"):`` a critical section under lease ``name``; released in ``finally``."""
    lease = acquire(store, name, ttl_s=ttl_s, owner=owner, wait_s=wait_s)
    try:
        yield lease
    finally:
        release(store, lease)


__all__ = ["Lease", "LeaseHeld", "acquire", "alive", "current", "default_owner", "hold", "release", "renew"]
