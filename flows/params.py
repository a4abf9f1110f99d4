"""Flow parameters as pydantic models: Prefect renders them as a UI form and validates deployment values."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mip_core.training import TrainConfig


class VanillaSpec(BaseModel):
    """What to build for a vanilla run: benchmark, tiny model, training budget and the evaluation split."""

    # A misspelt key in a deployment's parameters must fail the run, not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    workdir: str = Field(description="Folder for every artifact: bench/, vanilla/ and vanilla_eval.json. "
                                     "Relative paths resolve against the worker's working directory.")
    profiles: int = Field(100, ge=4, description="Number of fictitious people in the synthetic benchmark.")
    seed: int = Field(0, ge=0, description="Seed of the benchmark, the model's initial weights and training.")
    arch: Literal["qwen2_5_vl", "qwen2_vl", "llava"] = Field(
        "qwen2_5_vl", description="Architecture of the tiny random model that is fine-tuned.")
    size: Literal["demo", "test"] = Field(
        "demo", description="Tiny model size: 'demo' memorises 100 profiles; 'test' is for CI-sized runs.")
    steps: int = Field(7000, ge=1, description="Maximum optimiser steps (`minutes` may stop earlier).")
    minutes: float = Field(15, gt=0, description="Wall-clock budget for the training loop, in minutes.")
    forget_pct: Literal[5, 10, 15] = Field(
        10, description="Forget split to report, in % of profiles (the other profiles are the retain split).")
    reuse: bool = Field(True, description="Keep a matching benchmark and a trained model already in "
                                          "`workdir` instead of rebuilding them; off forces a rebuild.")

    def train_config(self) -> TrainConfig:
        """The library's training schedule for this spec; threads come from the worker (``$MIP_THREADS``)."""
        return TrainConfig(steps=self.steps, max_minutes=self.minutes, seed=self.seed,
                           threads=int(os.environ.get("MIP_THREADS", "1")))


class GateSpec(BaseModel):
    """Publication thresholds (``mip_core.service.gate.GateConfig``), each per modality."""

    model_config = ConfigDict(extra="forbid")

    min_forgetting: float = Field(0.5, ge=0, le=1, description="Forget accuracy must fall by at least this "
                                  "fraction of what the starting model knew.")
    min_retention: float = Field(0.8, ge=0, le=1, description="Other people's accuracy kept at least this "
                                 "fraction of the starting model's.")
    min_utility: float = Field(0.8, ge=0, le=1, description="General-knowledge accuracy kept at least this "
                               "fraction of the starting model's.")
    max_relapse: float = Field(0.05, ge=0, le=1, description="People earlier versions forgot: their accuracy may "
                               "rise by at most this much (a sample of their items is re-checked every batch).")
    relapse_alpha: float = Field(0.1, gt=0, le=1, description="Each such person is also judged on their own items: "
                                 "a rise over max_relapse counts when guessing would score that well with less "
                                 "than this probability (RMisU pushes them again at the same level, "
                                 "RMisUConfig.relapse_alpha).")
    # 0.6: under what path-restricted MIP keeps (0.83-0.93), above whole-model RMU's 0.18-0.33 (BENCHMARKS.md s. 9)
    min_generation: float = Field(0.6, ge=0, le=1, description="Other people's and general-knowledge items: the "
                                  "edited model's greedy answers must keep at least this mean ROUGE-L against the "
                                  "starting model's (multiple choice alone misses broken generation); 0 disables.")
    against_registered: bool = Field(True, description="On an edited version, also judge against the registered "
                                     "model the lineage started from: the three floors above hold against it too "
                                     "(losses each under a floor cannot add up across versions), and a request "
                                     "is forgotten when its forgetting rate reaches min_forgetting against either.")

class ServiceSpec(BaseModel):
    """How a batch runs: where the queue and models live, how attribution and the edit are spread, the gate."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(default_factory=lambda: os.environ.get("MIP_ROOT", "mip_store"),
                      description="Storage root: a folder, or s3://bucket/prefix (endpoint and credentials come "
                                  "from MIP_S3_ENDPOINT_URL / AWS_* on the worker). Default: $MIP_ROOT.")
    target_model: str | None = Field(None, description="Only claim requests for this model (None: every model, "
                                                       "one batch per model).")
    max_requests: int = Field(1000, ge=1, description="At most this many requests per target model per run; "
                              "the rest wait for the next run.")
    requests_per_batch: int | None = Field(4, ge=1, description="A run's requests are edited in batches of this "
                                           "many, one after another, each on the version the one before published "
                                           "(BENCHMARKS.md section 10: on the demo model, batches of 4 leave the "
                                           "forgotten people at the gold model's level; one batch of 16 or 32 does "
                                           "more per night, in one version, but pushes them 0.05 below it, where a "
                                           "membership attack finds them more easily). None: one batch per model.")
    n_actors: int = Field(2, ge=1, description="Ray attribution actors (one GPU each where the cluster has GPUs). "
                                               "RAY_ADDRESS selects an existing cluster.")
    max_shard: int | None = Field(None, ge=1, description="Cap on items per shard (default: items / actors).")
    attribution: dict[str, Any] = Field(default_factory=dict, description="AttributionConfig overrides, e.g. "
                                        '{"steps": 4, "top_k": 5}.')
    method: Literal["mip", "mip_paper", "mip_text", "mip_vision", "random"] = Field(
        "mip", description="Path-restricted edit to apply (see docs/editing.md); 'random' edits as many random "
                           "neurons per layer as the paths hold, the control benchmarks compare against.")
    edit: dict[str, Any] = Field(default_factory=dict, description="EditConfig overrides, with an optional "
                                 '"rmisu" dict of RMisUConfig fields, e.g. {"rmisu": {"steps": 300}}.')
    gpus_per_actor: int = Field(1, ge=1, description="GPUs each attribution actor spans where the cluster has "
                                "GPUs (a 72B model in bf16 needs at least 2 x 80 GB); the model is placed across "
                                "them. Ignored on a CPU cluster.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype in every stage: 'auto' keeps the checkpoint's stored dtype (bf16 for "
                            "real checkpoints).")
    ds_profile: Literal["auto", "cpu", "gpu", "gpu-offload"] = Field(
        "auto", description="DeepSpeed config of the edit job: 'cpu' (gloo, fp32), 'gpu' (one GPU node, bf16, "
                            "ZeRO-3), 'gpu-offload' (ZeRO-3 with parameters offloaded to CPU, for 70B on one "
                            "node); 'auto' picks cpu or gpu from the machine.")
    version_format: Literal["delta", "full"] = Field(
        "delta", description="How an edited version is stored: 'delta' links every file of its base and adds the "
                             "edited neurons' rows and columns (kilobytes to megabytes; `mip export` writes a plain "
                             "checkpoint for serving); 'full' writes a plain checkpoint, rewriting every shard that "
                             "holds an edited matrix (with paths in every layer, most of the model).")
    edit_timeout_s: float = Field(1800, gt=0, description="The edit job is stopped (and the batch fails with "
                                  "its log tail) after this many seconds.")
    launcher: Literal["deepspeed", "torchrun", "inprocess"] = Field(
        "deepspeed", description="How the edit job starts: a DeepSpeed ZeRO-3 job (or torchrun), or in this "
                                 "process on one device.")
    ranks: int = Field(2, ge=1, description="Edit job ranks (GPUs, or gloo CPU processes here).")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node edits (infra/deepspeed).")
    retain_limit: int = Field(120, ge=1, description="Other people's items (held out from the edit) the gate "
                                                      "scores.")
    # 1000: on the demo model, holding against every other person's item (678) instead of 120 kept other people's
    # greedy answers at 0.75-0.84 ROUGE-L of the registered model's after 4 versions, not 0.61-0.62 (BENCHMARKS.md
    # section 10). Each step still draws 6; the pool costs its encoding and the memory of its examples (images too).
    edit_retain_limit: int | None = Field(1000, ge=1, description="Other people's items the edit holds against, "
                                          "drawn apart from the gate's; None: as many as the gate scores.")
    probe_min_confidence: float = Field(0.5, ge=0, le=1, description="For requests that name a person: a probe "
                                        "(a registered question template answered by the model) is kept when the "
                                        "model's answer has at least this geometric-mean token probability.")
    gate: GateSpec = Field(default_factory=GateSpec)
    split_held_back: bool = Field(True, description="No request fails only because it shared a batch: a batch "
                                  "of several requests the gate holds back is split in two and each half retried "
                                  "the same night, and a published batch retries alone the requests it did not make "
                                  "forgotten (a request judged alone that does not pass fails with its own "
                                  "figures); off: its requests fail with the batch.")
    when_spent: Literal["alone", "close"] = Field("alone", description="Once one request alone is held back by "
                                                  "the gate's floors against the registered model and nothing "
                                                  "else (the lineage has spent its room): 'alone' edits each of "
                                                  "the model's remaining requests of the run on its own, so each "
                                                  "is published or fails with its own figures (an edit apiece); "
                                                  "'close' closes them failed unedited, naming the remedy "
                                                  "(retrain and register), to save those edits.")
    run_lease_ttl_s: float = Field(600, ge=1, description="A run renews its lease every ttl/4 seconds; a batch "
                                   "whose run stopped renewing for this long (killed process, lost node) is "
                                   "resumed by the next nightly run.")
