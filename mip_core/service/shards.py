"""How a batch's attribution is split across Ray actors, and what each shard reports back (pure, no Ray).

A shard is a contiguous range of the batch's distinct forget items. Its size follows from the item and actor
counts (``ceil(n_items / n_actors)``, so every actor gets one shard), capped by ``max_shard`` so that a big
batch becomes more, smaller shards than actors: a failed shard then costs less to redo and a slow actor holds
up less. The driver (``tasks.actors.attribute_batch``) gives each actor one shard at a time (``ray.util.ActorPool``).

Memory (docs/scale.md, "Attribution actors"): an actor spans ``gpus_per_actor`` GPUs of one node and holds the
model once over them; its items per pass follow from the memory left after the weights (:func:`items_per_pass`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mip_core.errors import InputError, MipError


class ShardError(MipError, RuntimeError):
    """A shard failed twice (its first try and Ray's retry); the message names the shard and both errors."""


class ActorStartError(ShardError):
    """The attribution actors could not start (e.g. the model or benchmark cannot be loaded); not retried."""


class ShardOOM(ShardError):
    """A shard ran out of memory even one item per pass (``mip_core.errors.AttributionOOM`` in the actor).

    Not retried: another actor has the same memory. Its items were not scored, so no request may close on it.
    Raised in the actor, outside Ray's ``retry_exceptions``, and re-raised by the driver.
    """


class ShardAttemptError(MipError, RuntimeError):
    """One try of shard ``shard`` failed in its actor with ``error``; ``first`` is the first try's error on a retry
    in the same actor process, else "".

    The only error Ray retries (the actor's ``retry_exceptions``). It names the shard because Ray's errors name
    only the actor, and it carries the first try's error because Ray keeps no trail of the tries it retried.
    """

    def __init__(self, shard: int, error: str, first: str = "") -> None:
        super().__init__(shard, error, first)  # the arguments rebuild it when Ray unpickles it in the driver
        self.shard, self.error, self.first = shard, error, first

    def __str__(self) -> str:
        return f"shard {self.shard}: {self.error}" + (f" (first try: {self.first})" if self.first else "")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def shard_items(n_items: int, n_actors: int, *, max_shard: int | None = None) -> list[range]:
    """Contiguous, non-empty ranges covering ``range(n_items)`` exactly once, in order.

    Shard size = ``ceil(n_items / n_actors)``, at most ``max_shard``; the last shard may be smaller. No items
    give no shards.

    >>> shard_items(10, 3)
    [range(0, 4), range(4, 8), range(8, 10)]
    >>> shard_items(10, 2, max_shard=3)
    [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
        raise InputError(f"n_items must be an integer >= 0, got {n_items!r}")
    _positive_int("n_actors", n_actors)
    if max_shard is not None:
        _positive_int("max_shard", max_shard)
    if n_items == 0:
        return []
    size = math.ceil(n_items / n_actors)
    if max_shard is not None:
        size = min(size, max_shard)
    return [range(start, min(start + size, n_items)) for start in range(0, n_items, size)]


def actor_options(n_gpus_available: float, n_actors: int, *, n_cpus_available: float | None = None,
                  gpus_per_actor: int = 1) -> dict[str, float]:
    """Ray resource options for each attribution actor.

    ``gpus_per_actor`` whole GPUs per actor when the cluster has them for every actor (:func:`actors_that_fit`
    lowers ``n_actors`` to make multi-GPU actors fit). Ray grants one actor's resources on one node, so its GPUs
    are packed as a one-bundle STRICT_PACK placement group would pack them; a plain ``num_gpus`` does that without
    a group to create, wait for and remove around every replacement actor. Otherwise CPU actors: one CPU each,
    or, when ``n_cpus_available`` (the cluster's CPU count) is given, an equal share of all CPUs but one, so the
    driver, or a Prefect task running as a Ray task, never waits for a slot behind its own actors (a 2-core box
    with 2 actors gives 0.5 each). Torch's thread count is set separately (``MIP_THREADS``).

    >>> actor_options(4, 2)
    {'num_gpus': 1, 'num_cpus': 1}
    >>> actor_options(8, 2, gpus_per_actor=4)
    {'num_gpus': 4, 'num_cpus': 1}
    >>> actor_options(0, 2, n_cpus_available=2)
    {'num_cpus': 0.5}
    """
    n_actors = _positive_int("n_actors", n_actors)
    per_actor = _positive_int("gpus_per_actor", gpus_per_actor)
    if n_gpus_available >= n_actors * per_actor:
        return {"num_gpus": per_actor, "num_cpus": 1}
    if per_actor > 1 and n_gpus_available > 0:  # a model sized for several GPUs must not fall back to CPU
        raise InputError(f"{n_actors} attribution actor(s) of gpus_per_actor={per_actor} GPUs need "
                         f"{n_actors * per_actor} GPUs; the cluster has {n_gpus_available:g}. Lower "
                         f"gpus_per_actor or n_actors, or add GPUs")
    if n_cpus_available is None:
        return {"num_cpus": 1}
    share = (n_cpus_available - 1) / n_actors
    if share <= 0:
        raise InputError(f"n_cpus_available={n_cpus_available!r} leaves no CPU for {n_actors} actors after "
                         "one for the driver; start Ray with more CPUs (ray.init(num_cpus=...)) or use a "
                         "cluster")
    # a share rounded down to 1/100 (Ray's resource precision is 1e-4): the actors must fit together
    return {"num_cpus": min(1.0, math.floor(share * 100) / 100) or 0.01}


def actors_that_fit(n_gpus_available: float, n_actors: int, gpus_per_actor: int) -> int:
    """``n_actors``, lowered so that actors of several GPUs each fit on the cluster's GPUs together.

    Single-GPU actors keep the old rule (all on GPU or all on CPU, see :func:`actor_options`).

    >>> actors_that_fit(8, 4, 4)
    2
    """
    n_actors = _positive_int("n_actors", n_actors)
    if _positive_int("gpus_per_actor", gpus_per_actor) > 1 and n_gpus_available >= gpus_per_actor:
        return min(n_actors, int(n_gpus_available // gpus_per_actor))
    return n_actors


TOKENS_PER_ITEM = 512
"""Rows one item puts through the model per interpolation copy, for planning a pass: a question, its answer and
one image's merged tokens (256 for a 448-pixel image), rounded up."""
HEADROOM = 0.5
"""Share of the memory left after the weights that a pass may plan to fill (attention, the allocator's slack)."""


def items_per_pass(configured: int, free_bytes: float, *, steps: int, widths: Sequence[tuple[int, int]],
                   vocab: int, bytes_per_value: int, tokens_per_item: int = TOKENS_PER_ITEM) -> int:
    """Items per forward/backward pass on GPUs with ``free_bytes`` left after the weights (``batch_items``).

    One item's pass holds, per row (``steps`` copies of ``tokens_per_item`` rows), what the backward keeps of
    every MLP site, ``8 * d_model + 3 * d_mlp`` values per ``(d_model, d_mlp)`` in ``widths``, plus float32
    logits and log-probabilities (``2 * vocab * 4`` bytes). The result is the configured value, lowered to what
    fits in :data:`HEADROOM` of the free memory, at least 1 (a pass that still runs out is re-split, then
    raises ``AttributionOOM``).

    >>> items_per_pass(8, 40e9, steps=4, widths=[(4096, 11008)] * 32, vocab=32000, bytes_per_value=2)
    2
    """
    row = sum(8 * d + 3 * m for d, m in widths) * bytes_per_value + 2 * vocab * 4
    per_item = steps * tokens_per_item * row
    return max(1, min(_positive_int("configured", configured), int(HEADROOM * free_bytes // per_item)))


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What one actor reports for one shard; the paths themselves are in the Parquet dataset at ``uri``.

    ``n_items``: distinct items attributed; ``n_paths``: item paths written (one per (item, request) pair that
    succeeded); ``failures``: ``(item_id, reason)`` of items that could not be attributed (also written to
    ``{uri}.failures.json``); ``actor``: ``host:pid`` of the actor process that did the work.
    """

    shard: int
    uri: str
    n_items: int
    n_paths: int
    failures: tuple[tuple[str, str], ...]
    seconds: float
    actor: str

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "uri": self.uri, "n_items": self.n_items, "n_paths": self.n_paths,
                "failures": [list(f) for f in self.failures], "seconds": self.seconds, "actor": self.actor}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardResult:
        """Inverse of :meth:`to_dict` (results cross process boundaries, so wrong shapes raise InputError)."""
        try:
            failures = tuple((str(item_id), str(reason)) for item_id, reason in data["failures"])
            result = cls(shard=int(data["shard"]), uri=str(data["uri"]), n_items=int(data["n_items"]),
                         n_paths=int(data["n_paths"]), failures=failures, seconds=float(data["seconds"]),
                         actor=str(data["actor"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"a ShardResult needs keys shard, uri, n_items, n_paths, failures "
                             f"([[item_id, reason], ...]), seconds, actor; got {data!r} ({exc})") from None
        if min(result.shard, result.n_items, result.n_paths) < 0 or result.seconds < 0:
            raise InputError(f"a ShardResult has non-negative counts and seconds; got {data!r}")
        return result
