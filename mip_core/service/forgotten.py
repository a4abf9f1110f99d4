"""Who a model's lineage has already forgotten: people a new batch must neither keep nor let come back.

A published version's lineage names the batch that made it (``batch_id``) and its parent (``parent_version``).
Walking it from a batch's base version back to the registered model gives every request an earlier edit
completed (``done``, closed by that batch). Planning uses them twice:

- their people leave the kept sets, for the edit and for the gate. RMisU's retain term would otherwise train
  their answers back, and the gate would count forgetting them as damage. This is how people forgotten one night
  partly returned after the next (BENCHMARKS.md section 8);
- a seeded sample of their forget items joins the gate as the ``earlier`` set. A version under which they are
  answered again (accuracy up by more than ``GateConfig.max_relapse``) is not published.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .batch import BatchManifest
from .requests import ForgetRequest
from .store import ServiceStore


@dataclass(frozen=True)
class Forgotten:
    """Done requests of the lineage's earlier batches and their forget items, newest version first."""

    requests: tuple[ForgetRequest, ...]
    items: tuple[tuple[str, str, str], ...]  # (item id, request id, batch id)

    @property
    def batches(self) -> list[str]:
        return list(dict.fromkeys(batch for _, _, batch in self.items))


def forgotten_before(store: ServiceStore, target_model: str, base_version: str) -> Forgotten:
    """What the versions up to ``base_version`` of ``target_model`` forgot (nothing for a registered model)."""
    requests: list[ForgetRequest] = []
    items: list[tuple[str, str, str]] = []
    version: str | None = base_version
    seen: set[str] = set()
    while version and version not in seen:
        seen.add(version)
        info = store.model_info(target_model, version)
        batch = info.get("batch_id")
        key = store.batch_key(batch, "manifest.json") if batch else None
        if key and store.exists(key):
            manifest = BatchManifest.from_json(store.read_text(key))
            records = [store.get(rid) for rid in manifest.accepted]
            # done in this batch: a request split into a retry ends in the retry, and counts there
            done = {r.request_id for r in records if r.state == "done" and r.batch_id == batch}
            requests += [r.request for r in records if r.request_id in done]
            items += [(item_id, rid, batch) for item_id, rid in manifest.forget if rid in done]
        version = info.get("parent_version")
    return Forgotten(tuple(requests), tuple(items))


def asked_elsewhere(store: ServiceStore, target_model: str, batch_requests: Sequence[str]) -> list[ForgetRequest]:
    """The model's requests outside this batch, whatever their state but ``rejected``: waiting for a later batch of
    the night, failed, or done in another lineage. Their people are left out of the batch's kept sets, as the
    lineage's forgotten people are.

    Why: an edit told to keep a person's facts trains them back, and a gate would count forgetting them as damage.
    On a night of 32, a person whose request failed early was kept by every later batch and ended at 0.833 / 0.8
    (multiple choice, photo / text) from 0.667 / 0.2 on the version their last batch started from (BENCHMARKS.md
    section 10); and a batch early in the night was trained to keep the people the next batches were to forget."""
    mine = set(batch_requests)
    return [r.request for r in store.list(target_model=target_model)
            if r.state != "rejected" and r.request_id not in mine]


def registered_version(store: ServiceStore, target_model: str, version: str) -> str:
    """The version ``version``'s edits start from: the newest one in its lineage that an operator registered
    (no ``batch_id``), not one an edit published. The gate's kept-set floors hold against it as well as against
    the starting version. A model re-registered under the same name (a retrained one) starts a new reference,
    though its lineage names the version that was current before it."""
    seen: set[str] = set()
    while version not in seen:
        seen.add(version)
        info = store.model_info(target_model, version)
        if not info.get("batch_id") or not info.get("parent_version"):
            return version
        version = info["parent_version"]
    return version  # a loop in hand-edited lineage: stop where it closes rather than walk forever


__all__ = ["Forgotten", "asked_elsewhere", "forgotten_before", "registered_version"]
