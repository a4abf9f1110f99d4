"""Ray-sharded attribution: a pool of actors, each holding the model once, scores shards of forget items.

No Prefect here, so any driver (a Prefect task, a CLI, a notebook) can call :func:`attribute_batch`. Layout
under ``out_prefix`` (one entry per shard ``k``)::

    out_prefix/shard-0000/                 item_paths/1 Parquet dataset (its _manifest.json commits the shard)
    out_prefix/shard-0000.failures.json    {"shard", "run_id", "failures": [{"item_id", "reason"}]}

``failures.json`` sits *next to* the dataset, not inside it: ``write_item_paths`` refuses to overwrite a
location holding foreign files (so a retried shard would fail), and ``pyarrow.dataset`` would try to read it
as Parquet. It is written before the dataset, so a shard whose dataset manifest exists is complete.

Reducing all shards (``read_item_paths`` + ``reduce_paths``) gives the same path graph as one in-process
``attribute_items`` over every item: each item's path is computed on its own rows of a batch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util import ActorPool

from mip_core.attribution import AttributionConfig, attribute_items
from mip_core.service.items import load_items
from mip_core.errors import AttributionOOM, InputError
from mip_core.modeling import LoadedModel, load_model
from mip_core.modeling.io import DTYPES, localize
from mip_core.parquet_io import write_item_paths
from mip_core.service.shards import (
    ActorStartError,
    ShardAttemptError,
    ShardError,
    ShardOOM,
    ShardResult,
    actor_options,
    actors_that_fit,
    items_per_pass,
    shard_items,
)
from mip_core.storage import filesystem, is_remote
from mip_core.types import ItemPath

__all__ = ["AttributionActor", "actor_options", "attribute_batch", "forwarded_env", "shard_uri"]

FORWARDED_ENV_PREFIXES = ("AWS_", "MIP_S3_", "MIP_NO_BENCHMARK")
"""Driver variables given to the actors (S3 endpoint and credentials, the no-benchmark guard): workers of a Ray
cluster started before the driver set them would not see them otherwise."""

_MODEL_LOADS = 0  # per actor process: how many times a model was loaded (ping reports it; tests expect 1)


def shard_uri(out_prefix: str, shard: int) -> str:
    """Where shard ``shard``'s item paths go; its failures are at ``shard_uri(...) + ".failures.json"``."""
    return f"{out_prefix.rstrip('/')}/shard-{shard:04d}"


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The storage variables of ``environ`` (default: this process) that actors get via ``runtime_env``."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def attribution_config(cfg: Mapping[str, Any] | None) -> AttributionConfig:
    """``AttributionConfig(**cfg)``: unknown keys or bad values raise the config's own InputError naming them."""
    return AttributionConfig(**dict(cfg or {}))


WEIGHT_SHARE = 0.9
"""Share of each GPU's free memory the weights may take when an actor spreads the model over its GPUs."""


def load_on_gpus(local: str, dtype: str) -> LoadedModel:
    """The model spread over this process's visible GPUs (Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's).

    ``device_map="auto"`` balances the layers over the GPUs; ``max_memory`` keeps the weights within
    :data:`WEIGHT_SHARE` of each GPU's free memory, and ``load_model`` raises rather than offload to CPU or disk.
    """
    budget = {i: int(WEIGHT_SHARE * torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}
    return load_model(local, dtype=dtype, device_map="auto", max_memory=budget)


def _fitting_batch_items(loaded: LoadedModel, cfg: AttributionConfig) -> int:
    """``cfg.batch_items`` lowered to what fits in the GPUs' memory left after the weights.

    The free memory planned with is the smallest GPU's times the GPU count: the layers, and so their
    activations, are balanced over the GPUs (see :func:`mip_core.service.shards.items_per_pass`).
    """
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    adapter, model = loaded.adapter, loaded.model
    widths = [(adapter.down_proj(s).out_features, s.d_mlp) for s in adapter.sites()]
    head = model.get_output_embeddings()
    vocab = head.out_features if head is not None else 0
    return items_per_pass(cfg.batch_items, min(free) * len(free), steps=cfg.steps, widths=widths, vocab=vocab,
                          bytes_per_value=next(model.parameters()).element_size())


@ray.remote(max_restarts=1, max_task_retries=1)
class AttributionActor:
    """Holds one model and benchmark in memory and attributes shards of items with them, a call at a time.

    On GPUs the model is spread over all of the actor's GPUs (``gpus_per_actor``) and ``batch_items`` is
    lowered to what fits in the memory left after the weights; on CPU both stay as configured.

    Faults are Ray's to handle: an actor whose process dies is restarted once (a new process that loads the model
    again, ``max_restarts``) and the call it was running is retried once (``max_task_retries``, a budget shared
    with the retry of a raised error, see :meth:`score`). A constructor that raises is never restarted (Ray's
    rule), so a model or benchmark that cannot load fails the first ``ping`` at once.
    """

    def __init__(self, model_uri: str, bench_uri: str, attribution_cfg: Mapping[str, Any],
                 endpoint_url: str | None = None, dtype: str = "auto") -> None:
        global _MODEL_LOADS
        torch.set_num_threads(int(os.environ.get("MIP_THREADS", "1")))
        start = time.perf_counter()
        self.cfg = attribution_config(attribution_cfg)
        self.endpoint_url = endpoint_url
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        local = localize(model_uri, endpoint_url)
        if self.device == "cuda":
            self.loaded = load_on_gpus(local, dtype)
            self.cfg = replace(self.cfg, batch_items=_fitting_batch_items(self.loaded, self.cfg))
        else:
            self.loaded = load_model(local, dtype=dtype, device="cpu")
        _MODEL_LOADS += 1
        self.bench_uri = bench_uri
        self.bench = load_items(localize(bench_uri, endpoint_url))  # a benchmark or a batch's item table
        self.by_id = {it.item_id: it for it in self.bench.items}
        self.load_seconds = time.perf_counter() - start
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.calls = 0
        self.first_errors: dict[int, str] = {}  # shard -> its first try's error in this process

    def ping(self) -> dict[str, Any]:
        """Who and where this actor is, what its weights measure up to, how often it loaded a model, whether Ray
        restarted it and which shards' first tries failed in it (``retried``: shard -> error)."""
        params = list(self.loaded.model.parameters())
        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device,
                "actor_id": context.get_actor_id(), "restarted": context.was_current_actor_reconstructed,
                "retried": dict(self.first_errors),
                "model_loads": _MODEL_LOADS, "load_seconds": self.load_seconds, "calls": self.calls,
                "threads": torch.get_num_threads(), "batch_items": self.cfg.batch_items,
                "param_devices": sorted({str(p.device) for p in params}),
                "param_dtypes": sorted({str(p.dtype) for p in params})}

    @ray.method(retry_exceptions=[ShardAttemptError])
    def score(self, shard: int, items: Sequence[tuple[str, str]], out_uri: str, run_id: str) -> dict[str, Any]:
        """:meth:`_score`, its errors naming the shard (a Ray error names only the actor).

        ``AttributionOOM`` becomes ``ShardOOM``, which is not in ``retry_exceptions``: another try has the same
        memory. Any other error becomes ``ShardAttemptError``, which Ray retries once, on this actor; the retry's
        error carries the first try's, kept in this process since Ray keeps no trail of the tries it retried.
        """
        self.calls += 1
        try:
            return self._score(shard, items, out_uri, run_id)
        except AttributionOOM as exc:
            raise ShardOOM(f"attribution shard {shard} (output {out_uri}) ran out of memory on actor {self.name}, "
                           f"not retried: {exc}") from exc
        except Exception as exc:
            error = describe_error(exc)
            first = self.first_errors.get(shard, "")
            self.first_errors.setdefault(shard, error)
            raise ShardAttemptError(shard, error, first) from exc

    def _score(self, shard: int, items: Sequence[tuple[str, str]], out_uri: str, run_id: str) -> dict[str, Any]:
        """Attribute ``items`` ((item_id, request_id) pairs), write their paths to ``out_uri``, report.

        An item asked for by several requests is attributed once and written once per request. Items that
        cannot be attributed (including ids missing from the benchmark) are failures, not errors: the rest of
        the shard still completes. The dataset is written even when empty. Running out of memory is not an
        item's failure: ``AttributionOOM`` propagates and nothing is written.
        """
        start = time.perf_counter()
        requests: dict[str, list[str]] = {}
        for item_id, request_id in items:
            wanted = requests.setdefault(item_id, [])
            if request_id not in wanted:
                wanted.append(request_id)
        missing = "is not in the benchmark at {}; check how its request was resolved"
        failures = [(i, f"item {i!r} {missing.format(self.bench_uri)}")
                    for i in requests if i not in self.by_id]
        known = [self.by_id[i] for i in requests if i in self.by_id]
        lo = self.loaded
        paths, failed = attribute_items(lo.model, lo.adapter, lo.processor, self.bench, known, self.cfg,
                                        request_ids={i: reqs[0] for i, reqs in requests.items()})
        failures += [(f.item_id, f.reason) for f in failed]
        order = {item_id: n for n, item_id in enumerate(requests)}
        failures.sort(key=lambda f: order[f[0]])
        out: list[ItemPath] = [replace(p, request_id=r) for p in paths for r in requests[p.item_id]]
        # failures first, the dataset (whose manifest commits the shard) last
        fs, path = filesystem(out_uri, self.endpoint_url)
        if not is_remote(out_uri):
            fs.makedirs(path.rstrip("/").rsplit("/", 1)[0], exist_ok=True)
        doc = {"shard": shard, "run_id": run_id,
               "failures": [{"item_id": i, "reason": r} for i, r in failures]}
        fs.pipe_file(path.rstrip("/") + ".failures.json", (json.dumps(doc, indent=2) + "\n").encode())
        ref = write_item_paths(out, out_uri, run_id=run_id, endpoint_url=self.endpoint_url)
        return ShardResult(shard=shard, uri=ref.uri, n_items=len(requests), n_paths=len(out),
                           failures=tuple(failures), seconds=time.perf_counter() - start,
                           actor=self.name).to_dict()


@dataclass(frozen=True)
class _Plan:
    """The batch's shards: the (item, request) pairs each one scores and how errors name it."""

    groups: dict[str, list[tuple[str, str]]]  # distinct item id -> its (item, request) pairs, in order
    shards: list[range]  # ranges of ``ids``
    out_prefix: str
    run_id: str

    @property
    def ids(self) -> list[str]:
        return list(self.groups)

    def pairs(self, k: int) -> list[tuple[str, str]]:
        ids = self.ids
        return [pair for i in ids[self.shards[k].start:self.shards[k].stop] for pair in self.groups[i]]

    def where(self, k: int) -> str:
        r, ids = self.shards[k], self.ids
        return (f"shard {k} (items {r.start}..{r.stop - 1} of {len(ids)}, first {ids[r.start]!r}; "
                f"output {shard_uri(self.out_prefix, k)})")


def ensure_ray(n_actors: int) -> None:
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # the cluster's own auth settings (RAY_AUTH_MODE / RAY_AUTH_TOKEN) apply
        return
    # a local cluster, living as long as this process (its token auth: tasks/__init__.py);
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps its sockets on 127.0.0.1
    ray.init(num_cpus=max(2, n_actors), include_dashboard=False)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_error(exc: BaseException) -> str:
    """One line for logs and errors: the original exception of a failed call, not Ray's full traceback."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, (RayActorError, RayTaskError)):  # Ray's first line says why, the last one the init error
        lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
        ends = dict.fromkeys([lines[0], lines[-1]]) if lines else {}
        text = f"{type(exc).__name__}: " + " ... ".join(ends)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 600 else text[:600] + " ..."


def _check_args(run_id: str, items: Sequence[tuple[str, str]], attribution_cfg: Mapping[str, Any] | None,
                dtype: str) -> dict[str, list[tuple[str, str]]]:
    """The pairs grouped by item id, each once; bad arguments raise InputError here, before Ray or any actor."""
    if not isinstance(run_id, str) or not run_id:
        raise InputError(f"run_id must be a non-empty string, got {run_id!r}")
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in items:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
            raise InputError(f"items must be (item_id, request_id) pairs with a non-empty item_id; "
                             f"got {pair!r}")
        group = groups.setdefault(pair[0], [])
        if tuple(pair) not in group:
            group.append((pair[0], pair[1]))
    attribution_config(attribution_cfg)  # fail here, not in every actor
    if dtype != "auto" and dtype not in DTYPES:
        raise InputError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}; got {dtype!r}")
    return groups


def _pool_options(n_pool: int, gpus_per_actor: int, forward_env: bool) -> tuple[int, dict[str, Any]]:
    """How many actors fit on the cluster (started if need be) and each one's Ray options: resources as
    :func:`actor_options`, the driver's storage variables as ``runtime_env``."""
    ensure_ray(n_pool)
    resources = ray.cluster_resources()
    n_pool = actors_that_fit(resources.get("GPU", 0), n_pool, gpus_per_actor)
    options: dict[str, Any] = actor_options(resources.get("GPU", 0), n_pool, gpus_per_actor=gpus_per_actor,
                                            n_cpus_available=resources.get("CPU", 0))
    env = forwarded_env() if forward_env else {}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return n_pool, options


def _await_ready(actors: list[Any], model_uri: str, bench_uri: str, log: Callable[[str], Any]) -> dict[Any, str]:
    """Each actor's Ray id, once all have loaded the model and benchmark; one that cannot load them fails the batch
    here with one clear ActorStartError, instead of once per shard."""
    try:
        pings = ray.get([a.ping.remote() for a in actors])
    except RayActorError as exc:
        raise ActorStartError(f"attribution actors could not start (model {model_uri}, benchmark "
                              f"{bench_uri}): {describe_error(exc)}") from exc
    log(f"attribution: {len(actors)} actors ready, model loaded in "
        f"{max(p['load_seconds'] for p in pings):.1f} s at most")
    return {a: p["actor_id"] for a, p in zip(actors, pings)}


def _run_shards(actors: dict[Any, str], plan: _Plan, log: Callable[[str], Any]) -> list[ShardResult]:
    """Every shard through an ActorPool (one call per actor at a time, the next shard to the first actor free).

    Ray has retried whatever it retries (see :class:`AttributionActor`) before an error reaches here, so any error
    fails the batch (:func:`_final_error`).
    """
    pool = ActorPool(list(actors))
    running: dict[str, int] = {}  # actor id -> the shard it is scoring: a dead actor's error names only the actor

    def call(actor: Any, k: int) -> Any:
        running[actors[actor]] = k
        return actor.score.remote(k, plan.pairs(k), shard_uri(plan.out_prefix, k), plan.run_id)

    for k in range(len(plan.shards)):
        pool.submit(call, k)
    results: dict[int, ShardResult] = {}
    while pool.has_next():
        try:
            result = ShardResult.from_dict(pool.get_next_unordered())
        except (RayActorError, RayTaskError) as exc:
            raise _final_error(exc, plan, running) from exc
        results[result.shard] = result
        log(f"attribution: shard {result.shard} done on {result.actor}: {result.n_items} items, "
            f"{result.n_paths} paths, {len(result.failures)} failures, {result.seconds:.1f} s")
    return [results[k] for k in range(len(plan.shards))]


def _final_error(exc: RayActorError | RayTaskError, plan: _Plan, running: dict[str, int]) -> ShardError:
    """The batch's error for a shard that failed for good: ShardOOM as the actor raised it, else a ShardError
    naming the shard, its first and second error, and what to do."""
    cause = exc.cause if isinstance(exc, RayTaskError) else None
    if isinstance(cause, ShardOOM):
        return cause
    if isinstance(cause, ShardAttemptError):  # no first error: the first try never raised in this actor process
        k, retry = cause.shard, cause.error
        first = cause.first or "lost with its actor (it died or was unreachable; Ray retried the shard)"
    else:  # the retry died with its actor; the first try's error, if it raised one, was in that process
        k, retry = running.get(getattr(exc, "actor_id", None)), describe_error(exc)
        first = "not known here (it was in the dead actor's process; Ray retried the shard)"
    where = plan.where(k) if k is not None else f"shard (one of {sorted(set(running.values()))})"
    return ShardError(f"attribution {where} failed twice: {first}; retry: {retry}. Check the actor logs "
                      "(ray logs), then rerun the batch")


def _log_summary(actors: list[Any], log: Callable[[str], Any]) -> None:
    """One line per actor: its shards and model loads, what Ray restarted or retried; diagnostics only, never
    fails the batch."""
    with suppress(Exception):
        for p in ray.get([a.ping.remote() for a in actors], timeout=30):
            faults = ", restarted by Ray (its process died)" if p["restarted"] else ""
            faults += "".join(f"; Ray retried shard {k} after {error}" for k, error in p["retried"].items())
            log(f"attribution: actor {p['host']}:{p['pid']} on {p['device']} ({p['threads']} threads): "
                f"{p['calls']} shards, {p['model_loads']} model load(s); weights {'+'.join(p['param_dtypes'])} "
                f"on {'+'.join(p['param_devices'])}, {p['batch_items']} items per pass{faults}")


def attribute_batch(
    model_uri: str,
    bench_uri: str,
    items: Sequence[tuple[str, str]],
    out_prefix: str,
    *,
    run_id: str,
    n_actors: int,
    attribution_cfg: Mapping[str, Any] | None = None,
    max_shard: int | None = None,
    endpoint_url: str | None = None,
    forward_env: bool = True,
    log: Callable[[str], Any] = print,
    gpus_per_actor: int = 1,
    dtype: str = "auto",
) -> list[ShardResult]:
    """Attribute ``items`` ((item_id, request_id) pairs) on a pool of Ray actors, one dataset per shard.

    Distinct item ids are sharded with :func:`shard_items` (all requests of one item share its shard); shard
    ``k`` goes to :func:`shard_uri` ``(out_prefix, k)``. At most ``min(n_actors, #shards)`` actors are
    created, each loading the model once; a ``ray.util.ActorPool`` gives each one shard at a time. Ray retries a
    failed shard once: on the same actor after a raised error, on its restarted process after a death (see
    :class:`AttributionActor`). The actors are always killed at the end.

    Ray: uses the connected cluster, else ``RAY_ADDRESS``, else starts a local one (left running for later
    calls). Actors get ``gpus_per_actor`` GPUs of one node each when the cluster has them for every actor
    (fewer actors are started when multi-GPU actors would not all fit, :func:`actors_that_fit`), else a CPU
    share (:func:`actor_options`). Each actor loads the model once, in ``dtype`` ("auto": the checkpoint's),
    spread over its GPUs. With ``forward_env``, the driver's ``AWS_*``/``MIP_S3_*`` variables reach the
    actors through ``runtime_env`` (visible in the Ray dashboard: turn it off where workers have their own
    credentials).

    Returns:
        one :class:`ShardResult` per shard, in shard order ([] for no items, without touching Ray).
    Raises:
        InputError: bad arguments (named). ActorStartError: the actors cannot load the model or the benchmark
        (not retried). ShardOOM: a shard ran out of memory even one item per pass (not retried: raise
        ``gpus_per_actor`` or lower ``batch_items``). ShardError: a shard failed on its retry too.
    """
    groups = _check_args(run_id, items, attribution_cfg, dtype)
    plan = _Plan(groups, shard_items(len(groups), n_actors, max_shard=max_shard), out_prefix, run_id)
    if not plan.shards:
        log("attribution: no items, nothing to do")
        return []
    n_pool, options = _pool_options(min(n_actors, len(plan.shards)), gpus_per_actor, forward_env)
    log(f"attribution: {len(plan.ids)} items in {len(plan.shards)} shards on {n_pool} actors "
        f"({options.get('num_gpus', 0)} GPU, {options['num_cpus']} CPU each), one shard per actor at a time")
    args = (model_uri, bench_uri, dict(attribution_cfg or {}), endpoint_url, dtype)
    actors: list[Any] = []
    try:
        for _ in range(n_pool):  # one at a time: those created before a failure are still killed
            actors.append(AttributionActor.options(**options).remote(*args))
        results = _run_shards(_await_ready(actors, model_uri, bench_uri, log), plan, log)
        _log_summary(actors, log)
    finally:
        for actor in actors:
            with suppress(Exception):
                ray.kill(actor, no_restart=True)
    return results
