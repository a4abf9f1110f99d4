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
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from mip_core.attribution import AttributionConfig, attribute_items
from mip_core.service.items import load_items
from mip_core.errors import AttributionOOM, InputError, ModelLoadError
from mip_core.modeling import LoadedModel, load_model
from mip_core.modeling.io import DTYPES, localize
from mip_core.parquet_io import write_item_paths
from mip_core.service.shards import (
    ActorStartError,
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
    """``AttributionConfig(**cfg)``; unknown keys or bad values raise InputError naming them."""
    try:
        return AttributionConfig(**dict(cfg or {}))
    except TypeError:
        known = sorted(AttributionConfig.__dataclass_fields__)
        raise InputError(f"attribution_cfg keys must be among {known}; got {sorted(cfg or {})}") from None
    except ValueError as exc:
        raise InputError(f"attribution_cfg: {exc}") from None


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


@ray.remote
class AttributionActor:
    """Holds one model and benchmark in memory and attributes shards of items with them, a call at a time.

    On GPUs the model is spread over all of the actor's GPUs (``gpus_per_actor``) and ``batch_items`` is
    lowered to what fits in the memory left after the weights; on CPU both stay as configured.
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

    def ping(self) -> dict[str, Any]:
        """Who and where this actor is, what its weights measure up to, how often it loaded a model."""
        params = list(self.loaded.model.parameters())
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device,
                "model_loads": _MODEL_LOADS, "load_seconds": self.load_seconds, "calls": self.calls,
                "threads": torch.get_num_threads(), "batch_items": self.cfg.batch_items,
                "param_devices": sorted({str(p.device) for p in params}),
                "param_dtypes": sorted({str(p.dtype) for p in params})}

    def score(self, shard: int, items: Sequence[tuple[str, str]], out_uri: str, run_id: str
              ) -> dict[str, Any]:
        """Attribute ``items`` ((item_id, request_id) pairs), write their paths to ``out_uri``, report.

        An item asked for by several requests is attributed once and written once per request. Items that
        cannot be attributed (including ids missing from the benchmark) are failures, not errors: the rest of
        the shard still completes. The dataset is written even when empty. Running out of memory is not an
        item's failure: ``AttributionOOM`` propagates and nothing is written.
        """
        self.calls += 1
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


@dataclass
class _Call:
    shard: int
    attempt: int  # 0 = first try, 1 = the retry
    slot: int  # index in the pool
    actor: Any  # the ActorHandle the call went to
    first_error: str = ""


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
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    if cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    else:  # an actor death: Ray's first line says why, the last one holds the error raised in __init__
        lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
        ends = dict.fromkeys([lines[0], lines[-1]]) if lines else {}
        text = f"{type(exc).__name__}: " + " ... ".join(ends)
    return text if len(text) <= 600 else text[:600] + " ..."


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
    max_in_flight: int | None = None,
    endpoint_url: str | None = None,
    forward_env: bool = True,
    log: Callable[[str], Any] = print,
    gpus_per_actor: int = 1,
    dtype: str = "auto",
) -> list[ShardResult]:
    """Attribute ``items`` ((item_id, request_id) pairs) on a pool of Ray actors, one dataset per shard.

    Distinct item ids are sharded with :func:`shard_items` (all requests of one item share its shard); shard
    ``k`` goes to :func:`shard_uri` ``(out_prefix, k)``. At most ``min(n_actors, #shards)`` actors are
    created, each loading the model once; at most ``max_in_flight`` calls (default: one per actor) are
    queued, each on the least-busy actor. A shard whose call fails (the actor died or the call raised) is
    retried once, on a replacement actor or another one; the actors are always killed at the end.

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
        InputError: bad arguments (named). ActorStartError: the first actors cannot load the model or the
        benchmark (not retried). ShardOOM: a shard ran out of memory even one item per pass (not retried:
        raise ``gpus_per_actor`` or lower ``batch_items``). ShardError: a shard failed on its retry too.
    """
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
    ids = list(groups)
    shards = shard_items(len(ids), n_actors, max_shard=max_shard)
    if not shards:
        log("attribution: no items, nothing to do")
        return []
    in_flight = n_actors if max_in_flight is None else max_in_flight
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
        raise InputError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    n_pool = min(n_actors, len(shards))
    shard_pairs = [[pair for i in ids[r.start:r.stop] for pair in groups[i]] for r in shards]

    ensure_ray(n_pool)
    resources = ray.cluster_resources()
    n_pool = actors_that_fit(resources.get("GPU", 0), n_pool, gpus_per_actor)
    options: dict[str, Any] = actor_options(resources.get("GPU", 0), n_pool, gpus_per_actor=gpus_per_actor,
                                            n_cpus_available=resources.get("CPU", 0))
    env = forwarded_env() if forward_env else {}
    if env:
        options["runtime_env"] = {"env_vars": env}
    cfg = dict(attribution_cfg or {})

    def new_actor() -> Any:
        return AttributionActor.options(**options).remote(model_uri, bench_uri, cfg, endpoint_url, dtype)

    log(f"attribution: {len(ids)} items in {len(shards)} shards on {n_pool} actors "
        f"({options.get('num_gpus', 0)} GPU, {options['num_cpus']} CPU each), at most {in_flight} in flight")
    pool: list[Any] = []
    spawned: list[Any] = []
    results: dict[int, ShardResult] = {}
    queue: deque[_Call] = deque(_Call(k, 0, -1, None) for k in range(len(shards)))
    pending: dict[Any, _Call] = {}

    def pick(avoid: int) -> int:
        busy = [sum(1 for c in pending.values() if c.actor is a) for a in pool]
        slots = [s for s in range(len(pool)) if s != avoid] or list(range(len(pool)))
        return min(slots, key=lambda s: (busy[s], s))

    try:
        for _ in range(n_pool):
            spawned.append(new_actor())
            pool.append(spawned[-1])
        try:  # fail fast and clearly when the model or benchmark cannot be loaded, instead of once per shard
            pings = ray.get([a.ping.remote() for a in pool])
        except RayActorError as exc:
            raise ActorStartError(f"attribution actors could not start (model {model_uri}, benchmark "
                                  f"{bench_uri}): {describe_error(exc)}") from exc
        log(f"attribution: {n_pool} actors ready, model loaded in "
            f"{max(p['load_seconds'] for p in pings):.1f} s at most")
        while queue or pending:
            while queue and len(pending) < in_flight:
                call = queue.popleft()
                call.slot = pick(call.slot)
                call.actor = pool[call.slot]
                k = call.shard
                pending[call.actor.score.remote(k, shard_pairs[k], shard_uri(out_prefix, k), run_id)] = call
            [ref], _ = ray.wait(list(pending), num_returns=1)
            call = pending.pop(ref)
            try:
                result = ShardResult.from_dict(ray.get(ref))
            except (RayActorError, RayTaskError) as exc:
                k, r = call.shard, shards[call.shard]
                error = describe_error(exc)
                if isinstance(getattr(exc, "cause", None), AttributionOOM):  # the same memory everywhere
                    raise ShardOOM(f"attribution shard {k} (items {r.start}..{r.stop - 1} of {len(ids)}; output "
                                   f"{shard_uri(out_prefix, k)}) ran out of memory on actor slot {call.slot}: "
                                   f"{exc.cause}") from exc
                if call.attempt >= 1:
                    raise ShardError(
                        f"attribution shard {k} (items {r.start}..{r.stop - 1} of {len(ids)}, first "
                        f"{ids[r.start]!r}; output {shard_uri(out_prefix, k)}) failed twice: "
                        f"{call.first_error}; retry: {error}. Check the actor logs (ray logs), then rerun "
                        "the batch"
                    ) from exc
                log(f"attribution: shard {k} failed on actor slot {call.slot} ({error}); retrying once")
                if isinstance(exc, RayActorError):  # the actor is gone: replace it (once per dead actor)
                    if pool[call.slot] is call.actor:
                        pool[call.slot] = new_actor()
                        spawned.append(pool[call.slot])
                    avoid = -1
                elif len(pool) == 1:  # the call raised and there is no other actor: add a fresh one
                    pool.append(new_actor())
                    spawned.append(pool[-1])
                    avoid = call.slot
                else:
                    avoid = call.slot
                queue.appendleft(_Call(k, 1, avoid, None, first_error=error))
                continue
            results[call.shard] = result
            log(f"attribution: shard {result.shard} done on {result.actor}: {result.n_items} items, "
                f"{result.n_paths} paths, {len(result.failures)} failures, {result.seconds:.1f} s")
        with suppress(Exception):  # a closing summary per actor; diagnostics only, never fails the batch
            for p in ray.get([a.ping.remote() for a in pool], timeout=30):
                log(f"attribution: actor {p['host']}:{p['pid']} on {p['device']} ({p['threads']} threads): "
                    f"{p['calls']} shards, {p['model_loads']} model load(s); weights {'+'.join(p['param_dtypes'])} "
                    f"on {'+'.join(p['param_devices'])}, {p['batch_items']} items per pass")
    finally:
        for actor in spawned:
            with suppress(Exception):
                ray.kill(actor, no_restart=True)
    return [results[k] for k in range(len(shards))]
