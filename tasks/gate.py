"""The publication gate where the model lives: each model is scored on a Ray actor, never in the flow process.

Why: at 70B no flow process can hold a model. :func:`score_on_actor` starts one actor with the attribution
actors' resource rule (``gpus_per_actor`` GPUs where the cluster has them, else a CPU share), loads the model
there, returns ``{item_id: correct}`` (plain data, no tensors) and kills the actor, so one model is in memory at a
time. :func:`gate_batch` scores only what the store does not know yet (``mip_core.service.scores``): the
starting version's missing items, and the edited model once; on the same actor load it takes the greedy answers
of the kept sets' items that the generation check compares. No Prefect here, so tests and CLIs can call it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import replace
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from mip_core.errors import MipError
from mip_core.evaluation.runner import answer_mean_logprobs
from mip_core.modeling import load_model
from mip_core.modeling.inputs import inputs_follow_model
from mip_core.modeling.io import localize
from mip_core.service.batch import BatchManifest
from mip_core.service.forgotten import registered_version
from mip_core.service.gate import (KEPT, GateConfig, GateDecision, RegisteredReference, answer_rouge, by_set,
                                   correct_by_id, decide, greedy_by_id, with_answer_logprobs)
from mip_core.service.items import load_items
from mip_core.service.probes import answers_by_id, probe_logprobs
from mip_core.service.scores import Scorer, forgotten_level, gate_scores, version_scores
from mip_core.service.shards import ActorStartError
from mip_core.service.store import ServiceStore
from tasks.actors import actor_options, describe_error, ensure_ray, forwarded_env, load_on_gpus

__all__ = ["ScoringActor", "ScoringError", "gate_batch", "probe_on_actor", "run_on_actor", "score_on_actor"]


class ScoringError(MipError, RuntimeError):
    """The scoring actor died while scoring (e.g. out of memory); the Prefect step retries it once."""


@ray.remote
class ScoringActor:
    """Holds one model and its benchmark; scores items by id, a call at a time."""

    def __init__(self, model_uri: str, dataset_uri: str, dtype: str, endpoint_url: str | None = None) -> None:
        torch.set_num_threads(int(os.environ.get("MIP_THREADS", "1")))
        start = time.perf_counter()
        local = localize(model_uri, endpoint_url)
        if ray.get_gpu_ids() and torch.cuda.is_available():  # spread over the actor's gpus_per_actor GPUs
            self.loaded, self.device = load_on_gpus(local, dtype), f"{torch.cuda.device_count()} GPU"
            inputs_follow_model(self.loaded.model)
        else:
            self.loaded, self.device = load_model(local, dtype=dtype, device="cpu"), "cpu"
        self.bench = load_items(localize(dataset_uri, endpoint_url))  # a benchmark or a batch's item table
        self.by_id = {it.item_id: it for it in self.bench.items}
        self.load_seconds = time.perf_counter() - start

    def ping(self) -> dict[str, Any]:
        """Where this actor runs (tests compare its pid with the driver's) and how long the load took."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device,
                "load_seconds": self.load_seconds}

    def score(self, item_ids: Sequence[str]) -> dict[str, bool]:
        return correct_by_id(self.loaded.model, self.loaded.processor, self.bench, item_ids)

    def score_and_logprob(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{"correct": {item_id: bool}, "logprob": {item_id: mean per-token log p}}``; the log-probability of
        free-form items only (the answer the model gave before the edit: how far it has moved from it)."""
        free = [i for i in item_ids if self.by_id[i].free_form]
        return {"correct": self.score(item_ids),
                "logprob": dict(zip(free, answer_mean_logprobs(self.loaded.model, self.loaded.processor,
                                                               self.bench, [self.by_id[i] for i in free]),
                                    strict=True))}

    def greedy_answers(self, item_ids: Sequence[str]) -> dict[str, str]:
        """``{item_id: greedy answer}``: what the gate's generation check compares across the edit."""
        return greedy_by_id(self.loaded.model, self.loaded.processor, self.bench, item_ids)

    def answer(self, item_ids: Sequence[str]) -> dict[str, tuple[str, float]]:
        """``{item_id: (answer, confidence)}``: the greedy answer where the item has none yet (a candidate probe),
        else the confidence of the given answer."""
        return answers_by_id(self.loaded.model, self.loaded.processor, self.bench, item_ids)


def _options(gpus_per_actor: int, forward_env: bool) -> dict[str, Any]:
    resources = ray.cluster_resources()
    options: dict[str, Any] = actor_options(resources.get("GPU", 0), 1, n_cpus_available=resources.get("CPU", 0),
                                            gpus_per_actor=gpus_per_actor)
    env = forwarded_env() if forward_env else {}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def score_on_actor(model_uri: str, dataset_uri: str, item_ids: Sequence[str], *, gpus_per_actor: int = 1,
                   dtype: str = "auto", endpoint_url: str | None = None, forward_env: bool = True,
                   log: Callable[[str], Any] = print, method: str = "score") -> dict[str, Any]:
    """``{item_id: correct}`` of ``model_uri`` on ``dataset_uri``'s items (or what the actor's ``method`` returns),
    computed on one fresh Ray actor (see :func:`run_on_actor`)."""
    ids = list(dict.fromkeys(item_ids))
    if not ids:
        return {}
    return run_on_actor(model_uri, dataset_uri, {method: ids}, gpus_per_actor=gpus_per_actor, dtype=dtype,
                        endpoint_url=endpoint_url, forward_env=forward_env, log=log)[method]


def run_on_actor(model_uri: str, dataset_uri: str, calls: Mapping[str, Sequence[str]], *, gpus_per_actor: int = 1,
                 dtype: str = "auto", endpoint_url: str | None = None, forward_env: bool = True,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:
    """``{method: what ScoringActor.<method>(item_ids) returned}`` for each of ``calls`` (method -> item ids), on
    one fresh Ray actor: one model load for all of them. Nothing to do (no calls): ``{}``, no actor.

    Ray: the connected cluster, else ``RAY_ADDRESS``, else a local one (as ``tasks.actors``). The actor is
    killed when done, whatever happens. Raises ActorStartError when the model or benchmark cannot be loaded,
    ScoringError when the actor dies while scoring; an error raised while scoring (e.g. an unknown item id)
    comes back as Ray's error, an instance of the original type.
    """
    todo = {method: list(dict.fromkeys(ids)) for method, ids in calls.items()}
    if not todo:
        return {}
    n = sum(len(ids) for ids in todo.values())
    ensure_ray(1)
    options = _options(gpus_per_actor, forward_env)
    actor = ScoringActor.options(**options).remote(model_uri, dataset_uri, dtype, endpoint_url)
    try:
        try:
            info = ray.get(actor.ping.remote())
        except RayActorError as exc:
            raise ActorStartError(f"the scoring actor could not load {model_uri} (benchmark {dataset_uri}, dtype "
                                  f"{dtype}): {describe_error(exc)}") from exc
        start = time.perf_counter()
        try:
            got = {method: ray.get(getattr(actor, method).remote(ids)) for method, ids in todo.items()}
        except RayActorError as exc:
            raise ScoringError(f"the scoring actor {info['host']}:{info['pid']} died scoring {n} items of "
                               f"{model_uri}: {describe_error(exc)}; check `ray logs`, then rerun") from exc
        log(f"{'probes' if 'answer' in todo else 'gate'}: {n} items of {model_uri} scored on actor "
            f"{info['host']}:{info['pid']} ({info['device']}, {options.get('num_gpus', 0)} GPU, "
            f"{options['num_cpus']} CPU) in {time.perf_counter() - start:.1f} s ({', '.join(todo)}), model "
            f"loaded in {info['load_seconds']:.1f} s")
        return got
    finally:
        with suppress(Exception):
            ray.kill(actor, no_restart=True)


def gate_batch(store: ServiceStore, batch_id: str, edited_uri: str, cfg: GateConfig, *, gpus_per_actor: int = 1,
               dtype: str = "auto", log: Callable[[str], Any] = print) -> GateDecision:
    """Score batch ``batch_id``'s gate items and answer its kept sets' (cached starting-version scores and
    answers, the edited model on an actor) and apply the gate. The edited model's scores and answers land in
    ``batches/<id>/scores/`` for ``promote_scores``."""
    m = BatchManifest.from_json(store.read_text(store.batch_key(batch_id, "manifest.json")))
    bench = load_items(localize(m.dataset_uri, store.endpoint_url))
    item_sets = m.item_sets(bench)
    ids = [it.item_id for items in item_sets.values() for it in items]
    kept_items = [it for name in KEPT for it in item_sets.get(name, ())]  # answered: the generation check's
    kept = [it.item_id for it in kept_items]
    log(f"gate: {', '.join(f'{len(v)} {k}' for k, v in item_sets.items())} items")

    moved: dict[str, float] = {}  # free-form item -> the edited model's mean log p of the answer given before

    def score(model_uri: str, wanted: Sequence[str], answer_ids: Sequence[str]
              ) -> tuple[dict[str, bool], dict[str, str]]:
        edited = model_uri == edited_uri  # the starting model's log p was recorded at probing: not scored again
        method = "score_and_logprob" if edited else "score"
        calls = {name: list(got_ids) for name, got_ids in ((method, wanted), ("greedy_answers", answer_ids))
                 if got_ids}
        got = run_on_actor(model_uri, m.dataset_uri, calls, gpus_per_actor=gpus_per_actor, dtype=dtype,
                           endpoint_url=store.endpoint_url, log=log)
        scored = got.get(method, {})
        if edited and scored:
            moved.update(scored["logprob"])
            scored = scored["correct"]
        return scored, got.get("greedy_answers", {})

    before, after = gate_scores(store, m, ids, edited_uri, dtype=dtype, score=score, answer_ids=kept, log=log)
    truth = {it.item_id: it.answer for it in kept_items}
    registered = _registered_reference(store, m, item_sets, after.answers, truth, cfg, dtype=dtype, score=score,
                                       log=log)

    # read and computed once: a request judged against the registered model too is decided a second time
    was, now = _with_forgotten_level(store, m, by_set(item_sets, before.correct)), by_set(item_sets, after.correct)
    rouge, request_of = answer_rouge(before.answers, after.answers, truth), m.request_of()

    def judged(reference: RegisteredReference | None) -> GateDecision:
        return decide(item_sets, was, now, cfg, request_of=request_of, rouge=rouge, registered=reference)

    decision = judged(registered)
    if registered and decision.request_reasons:  # judged against the registered model too: it scores their items
        unforgotten = [i for i, r in m.forget if r in decision.request_reasons]
        scores = version_scores(store, m, registered.version, _uri(store, m, registered.version), unforgotten, (),
                                dtype=dtype, score=score, log=log, what="the registered model")
        decision = judged(replace(registered, correct={**registered.correct, "forget": dict(scores.correct)}))
    return with_answer_logprobs(decision, item_sets, probe_logprobs(store, batch_id), moved, request_of)


def _uri(store: ServiceStore, m: BatchManifest, version: str) -> str:
    return store.uri(store.model_key(m.target_model, version))


def _registered_reference(store: ServiceStore, m: BatchManifest, item_sets: Mapping[str, Sequence[Any]],
                          says: Mapping[str, str], truth: Mapping[str, str], cfg: GateConfig, *, dtype: str,
                          score: Scorer, log: Callable[[str], Any]) -> RegisteredReference | None:
    """The registered model's kept-set scores and the edited model's ROUGE-L against its answers, from its cache
    (scoring what it lacks on an actor); None when the batch starts from the registered model itself (the
    starting-version figures are then the same) or judging against it is off (``GateConfig.against_registered``).
    Its forget-item scores are added by :func:`gate_batch` only for requests the starting version does not find
    forgotten: a load of it for every batch would double the gate's cost at 70B, for most requests for nothing."""
    root = registered_version(store, m.target_model, m.base_version)
    if root == m.base_version or not cfg.against_registered:
        return None
    kept = [it.item_id for name in KEPT for it in item_sets.get(name, ())]
    scores = version_scores(store, m, root, _uri(store, m, root), kept, kept,
                            dtype=dtype, score=score, log=log, what="the registered model")
    return RegisteredReference(root, {name: {it.item_id: scores.correct[it.item_id] for it in item_sets.get(name, ())}
                                      for name in KEPT}, answer_rouge(scores.answers, says, truth))


def _with_forgotten_level(store: ServiceStore, m: BatchManifest, before: dict[str, dict[str, bool]]
                          ) -> dict[str, dict[str, bool]]:
    """``before`` with the earlier-forgotten items at their level right after the edit that forgot them (where
    that batch kept its scores): relapse is measured from there, so small rises cannot add up over nights."""
    if not before.get("earlier"):
        return before
    # the batch that forgot an item is the one its request was closed done in: its record names it, so the
    # lineage planning already walked is not walked again
    batch_of = {item_id: str(store.get(request_id).batch_id) for item_id, request_id in m.eval_earlier}
    level = forgotten_level(store, {i: batch_of[i] for i in before["earlier"] if i in batch_of})
    return before | {"earlier": {i: level.get(i, was) for i, was in before["earlier"].items()}}


def probe_on_actor(model_uri: str, dataset_uri: str, item_ids: Sequence[str], *, gpus_per_actor: int = 1,
                   dtype: str = "auto", endpoint_url: str | None = None,
                   log: Callable[[str], Any] = print) -> dict[str, tuple[str, float]]:
    """The target model's greedy answers and confidences on candidate probes, computed where it can be held."""
    got = score_on_actor(model_uri, dataset_uri, item_ids, gpus_per_actor=gpus_per_actor, dtype=dtype,
                         endpoint_url=endpoint_url, log=log, method="answer")
    return {i: (str(a), float(c)) for i, (a, c) in got.items()}
