"""The edit step as its own job: ``python -m mip_core.entrypoints.edit --spec SPEC.json [--ds-config DS]``.

One :class:`EditSpec` (JSON, local or ``s3://``) says which model, which forget items (with their request
ids), which retain items, which path graph and where the edited model goes. The same code runs

- in-process on one device (:func:`run_edit` with one process): load -> encode -> ``get_method(...).run`` ->
  write;
- under ``deepspeed`` / ``torchrun`` (``WORLD_SIZE > 1``): every rank loads its own partition of the model
  (ZeRO-3), runs the *same* editing code (ranks share each batch and average gradients; the neuron slices are
  read from and written into the partitions, never gathered as whole matrices), and the ranks share the
  writing.

Both write the edited model without any process holding the full state dict: by default as a neuron-delta
version (:mod:`mip_core.modeling.deltas`: the base's files linked or copied server-side on S3, plus the edited
neurons' slices), or as a plain checkpoint whose shards holding edited tensors are rewritten, spread over the
ranks (:func:`mip_core.modeling.shards.write_edited`).

The job writes ``edit_summary.json`` (what :func:`run_edit` returns) beside the model, so the launcher reads
the outcome from storage instead of parsing logs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, field
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, StrictInt, StringConstraints

from mip_core.config import config_class
from mip_core.editing import MethodName
from mip_core.errors import InputError
from mip_core.storage import filesystem, is_remote
from mip_core.transfer import write_atomic

SUMMARY_FILE = "edit_summary.json"
SPEC_SCHEMA = "mip-edit-spec/2"
#: Specs a launched job may still read: /1 named the ``edit`` field ``path_edit``.
_OLD_SCHEMAS = {"mip-edit-spec/1": {"path_edit": "edit"}}
VersionFormat = Literal["delta", "full"]
VERSION_FORMATS = get_args(VersionFormat)

Log = Callable[[str], None]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


@config_class
class EditSpec:
    """Everything the edit job needs; JSON-serialisable, so the flow hands it over as one file.

    Bad values raise InputError naming the field (``EditSpec.forget[0][1]``); lists are read as tuples.
    """

    model_uri: Text  # model folder or s3:// prefix (save_model layout)
    bench_uri: Text  # benchmark or item-table folder, or s3:// prefix; localised when remote
    # (item_id, request_id) of every forget item: at least one, or there is nothing to unlearn
    forget: Annotated[tuple[tuple[str, str], ...], Field(min_length=1)]
    retain_item_ids: tuple[str, ...]  # retain items (held in place by the edit)
    graph_uri: Text  # path_graph/1 dataset (mip_core.parquet_io.write_path_graph)
    output_uri: Text  # where the edited model goes: local folder or s3:// prefix
    method: MethodName = "mip"  # a name of mip_core.editing.methods.METHODS
    edit: dict[str, Any] = field(default_factory=dict)  # EditConfig overrides: get_method(..., edit_overrides=...)
    seed: StrictInt = 0
    zero_stage: Literal[0, 1, 2, 3] = 3  # DeepSpeed ZeRO stage under a launcher (3: parameters partitioned)
    lineage: dict[str, Any] = field(default_factory=dict)  # into unlearn.json (requests, batch, versions)
    # "delta": the base's files plus the edited neurons' slices (mip_core.modeling.deltas; a neuron edit only);
    # "full": a plain checkpoint, the shards holding edited tensors rewritten whole
    version_format: VersionFormat = "delta"
    # (item_id, request_id) of people earlier versions forgot: the edit keeps them forgotten, forgetting again
    # those its check finds known (UnlearnData.forget_earlier); the gate's "earlier" sample
    earlier: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"schema": SPEC_SCHEMA, **asdict(self)}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EditSpec:
        """Read :meth:`to_json`'s text (or an older schema's); unknown or missing fields are InputError."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"edit spec is not valid JSON ({err}); write it with EditSpec.to_json()"
                             ) from err
        if not isinstance(doc, dict):
            raise InputError("edit spec must be a JSON object; write it with EditSpec.to_json()")
        schema = doc.pop("schema", SPEC_SCHEMA)
        if schema != SPEC_SCHEMA and schema not in _OLD_SCHEMAS:
            raise InputError(f"edit spec has schema {schema!r}, this version reads {SPEC_SCHEMA!r}")
        renamed = _OLD_SCHEMAS.get(schema, {})
        return cls(**{renamed.get(k, k): v for k, v in doc.items()})


def write_spec(spec: EditSpec, uri: str) -> str:
    """Write the spec JSON to ``uri`` atomically (local: temp file + rename; object stores: one PUT)."""
    write_text(uri, spec.to_json())
    return uri


def read_spec(uri: str) -> EditSpec:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise InputError(f"edit spec {uri} does not exist; the flow writes it before launching the job")
    with fs.open(path, "r") as f:
        return EditSpec.from_json(f.read())


def write_text(uri: str, text: str) -> None:
    """Whole-file write that readers never see half done (:func:`mip_core.transfer.write_atomic`, which also
    makes a local file's folder)."""
    write_atomic(uri, text.encode())


def zero3_config(*, offload: bool = False, train_micro_batch_size_per_gpu: int = 1,
                 gradient_accumulation_steps: int = 1, bf16: bool = False,
                 param_persistence_threshold: int = 0, zero_stage: int = 3) -> dict[str, Any]:
    """A DeepSpeed config for the edit job (ZeRO-3 by default).

    No optimizer section: the edit trains only small neuron slices outside the engine (plain AdamW); the
    engine only partitions and fetches the frozen weights. Named profiles (cpu, gpu, gpu-offload) are
    :func:`mip_core.entrypoints.edit_plan.ds_config_for`. ``param_persistence_threshold=0`` partitions every
    parameter, even small ones (DeepSpeed's default keeps tensors under 1e5 numbers whole on every rank,
    which would leave a tiny test model unpartitioned). ``bf16`` is for accelerators; CPU runs stay fp32.
    """
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "stage3_gather_16bit_weights_on_model_save": True,
        "stage3_param_persistence_threshold": param_persistence_threshold,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


# ------------------------------------------------------------------------------------------------ the edit
def _edit(loaded: Any, spec: EditSpec, log: Log) -> Any:
    """Encode the spec's items, read the graph, run the method on ``loaded`` in place (one rank or many)."""
    from mip_core.editing.data import unlearn_data
    from mip_core.editing.methods import get_method
    from mip_core.modeling.io import localize
    from mip_core.parquet_io import read_path_graph

    from mip_core.service.items import load_items

    bench = load_items(localize(spec.bench_uri))  # a benchmark, or a service batch's item table
    by_id = {it.item_id: it for it in bench.items}
    wanted = [i for i, _ in (*spec.forget, *spec.earlier)] + list(spec.retain_item_ids)
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise InputError(f"EditSpec names {len(missing)} item(s) the benchmark {spec.bench_uri} does not "
                         f"have, e.g. {missing[:5]}; was the spec made for another benchmark?")
    data = unlearn_data(loaded.processor, bench, [by_id[i] for i, _ in spec.forget],
                        [by_id[i] for i in spec.retain_item_ids], requests=dict((*spec.forget, *spec.earlier)),
                        earlier=[by_id[i] for i, _ in spec.earlier])
    graph = read_path_graph(spec.graph_uri)
    method = get_method(spec.method, edit_overrides=spec.edit, seed=spec.seed)
    return method.run(loaded.model, loaded.adapter, data, graph=graph, log=log)


def _summary(summary: Any, spec: EditSpec, world_size: int, seconds: float,
             memory: list[dict[str, int]], files: list[dict[str, list[str]]], partitioned: bool = False
             ) -> dict[str, Any]:
    return {"method": summary.method, "neurons": summary.details.get("neurons"), "steps": summary.steps,
            "edit_seconds": summary.seconds, "seconds": round(seconds, 2), "world_size": world_size,
            "zero_stage": spec.zero_stage if world_size > 1 else None, "partitioned": partitioned,
            "trainable_parameters": summary.trainable_parameters, "output_uri": spec.output_uri,
            "memory": memory, "files": files}


def _rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from ``/proc/self/status``, in KiB; 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
    except OSError:
        return 0


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (``VmHWM``) at the current RSS, so a phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _write_model(loaded: Any, summary: Any, spec: EditSpec, rank: int, size: int) -> dict[str, Any]:
    """Every rank: write its part of the edited model (:func:`write_edited`); returns what it did and its memory.

    Memory in KiB, read from the kernel: ``peak_rss_kib`` over the whole run, ``before_write_kib`` and
    ``write_peak_kib`` (the peak while writing, counted from a reset just before it).
    """
    from mip_core.modeling.deltas import write_delta
    from mip_core.modeling.shards import edited_parameters, plan_shards, write_edited

    neuron_ids = summary.details.get("neuron_ids")
    memory = {"rank": rank, "peak_rss_kib": _rss_kib("VmHWM"), "before_write_kib": _rss_kib("VmRSS")}
    reset = _reset_peak_rss()
    if spec.version_format == "delta" and neuron_ids is not None:
        files = write_delta(loaded.model, loaded.adapter, neuron_ids, loaded.path, spec.output_uri,
                            base_uri=spec.model_uri, rank=rank, world=size)
    else:  # a plain checkpoint, or a method that may change whole matrices (fine-tuning baselines)
        names = edited_parameters(loaded.model, loaded.adapter, summary.details)
        plan = plan_shards(loaded.model, names, loaded.path, spec.model_uri)
        files = write_edited(loaded.model, plan, spec.output_uri, rank=rank, world=size)
    if reset:
        memory["write_peak_kib"] = _rss_kib("VmHWM")
    return {"memory": memory, "files": files}


def run_edit(spec: EditSpec, *, distributed: bool | None = None, ds_config: dict[str, Any] | None = None,
             log: Log = print) -> dict[str, Any]:
    """Run the edit; returns the summary (also written as ``edit_summary.json`` beside the edited model).

    ``distributed=None`` decides from the launcher's environment (``WORLD_SIZE > 1``).
    """
    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        return _run_distributed(spec, ds_config or zero3_config(zero_stage=spec.zero_stage), log)
    from mip_core.modeling.io import load_model

    t0 = time.perf_counter()
    loaded = load_model(spec.model_uri)
    summary = _edit(loaded, spec, log)
    wrote = _write_model(loaded, summary, spec, 0, 1)
    _write_records(summary, spec)
    out = _summary(summary, spec, 1, time.perf_counter() - t0, [wrote["memory"]], [wrote["files"]])
    write_text(_join(spec.output_uri, SUMMARY_FILE), json.dumps(out, indent=1) + "\n")
    return out


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


@contextmanager
def _process_group() -> Iterator[tuple[int, int]]:
    """Initialise the gloo/nccl group from the launcher's variables; always barrier + destroy at the end.

    The shared-memory comm op is a C++ build of about 90 s on first use and brings nothing over gloo on CPU.
    On gloo, ZeRO-3's all-gathers are made to write in place (``gather_in_place_on_gloo``: no second copy of
    each gathered matrix). Without the final barrier + destroy, about 1 run in 12 aborted at exit on this stack.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from mip_core.parallel.zero3_slices import gather_in_place_on_gloo

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        backend = "gloo"
    else:  # one accelerator per rank, current before the first NCCL collective (untested here: no GPU)
        backend = accelerator.communication_backend_name()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)
    gather_in_place_on_gloo()
    try:
        yield dist.get_rank(), dist.get_world_size()
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _localize_per_node(uri: str) -> str:
    """Download a remote model once per node (local rank 0), then every rank reads the same cached folder."""
    import torch.distributed as dist

    from mip_core.modeling.io import localize

    if not is_remote(uri):
        return localize(uri)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    mine = localize(uri) if local_rank == 0 else None
    entries: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (socket.gethostname(), local_rank, mine))  # trusted peers: this job's ranks
    return next(p for host, lr, p in entries if host == socket.gethostname() and lr == 0)


def _rank_device() -> str:
    """This rank's device: ``cpu``, or the accelerator numbered ``LOCAL_RANK``."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return "cpu"
    return accelerator.device_name(int(os.environ.get("LOCAL_RANK", "0")))


def _run_distributed(spec: EditSpec, ds_config: dict[str, Any], log: Log) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from mip_core.parallel.zero3_slices import is_partitioned
    from mip_core.adapters import adapter_class  # imports the model classes before zero.Init patches torch
    from mip_core.modeling.io import check_model_dir, load_model, load_zero3

    t0 = time.perf_counter()
    with _process_group() as (rank, size):
        def rank_log(msg: str) -> None:
            log(f"[rank {rank}/{size}] {msg}")

        local = _localize_per_node(spec.model_uri)
        model_config = check_model_dir(local)
        adapter_class(model_config.get("model_type", "")).model_class  # noqa: B018 - import it now
        ds_config = fit_to_checkpoint(ds_config, model_config)
        rank_log(f"ZeRO config fitted to the checkpoint: {json.dumps(_fitted_view(ds_config))}")
        # kept alive while loading: from_pretrained then builds the model inside zero.Init (partitioned)
        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841
        loaded = load_zero3(local, rank=rank) if ds_config["zero_optimization"].get("stage") == 3 else \
            load_model(local, device=_rank_device())
        engine, *_ = deepspeed.initialize(model=loaded.model, config=ds_config)  # installs the fetch hooks
        partitioned = any(is_partitioned(p) for p in loaded.model.parameters())
        rank_log(f"model loaded in {time.perf_counter() - t0:.1f} s, partitioned={partitioned}, rss "
                 f"{_rss_kib('VmRSS') // 1024} MiB, peak {_rss_kib('VmHWM') // 1024} MiB")
        summary = _edit(loaded, spec, rank_log)
        rank_log(f"edit done: {summary.details.get('neurons')} neurons, {summary.steps} steps, "
                 f"peak rss so far {_rss_kib('VmHWM') // 1024} MiB")
        wrote = _write_model(loaded, summary, spec, rank, size)  # collective: gathers one module at a time
        parts: list[Any] = [None] * size
        # also the barrier: every rank's files are written
        dist.all_gather_object(parts, wrote)  # trusted peers: this job's ranks, summaries they computed
        out = _summary(summary, spec, size, time.perf_counter() - t0, [p["memory"] for p in parts],
                       [p["files"] for p in parts], partitioned)
        if rank == 0:
            _write_records(summary, spec)
            write_text(_join(spec.output_uri, SUMMARY_FILE), json.dumps(out, indent=1) + "\n")
            rank_log(f"wrote {spec.output_uri}")
        del hf_ds, engine
    return out


def fit_to_checkpoint(ds_config: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
    """The job's DeepSpeed config, completed from the checkpoint it edits (keys the profile set are kept).

    - Precision: a bf16 (or fp16) checkpoint is partitioned in that dtype. Without a ``bf16`` section ZeRO-3
      converts every parameter to fp32 while partitioning, which doubles each rank's share of a bf16 model.
    - Live parameters: DeepSpeed's defaults (1e9 live parameters, reuse distance 1e9) keep every layer it has
      gathered for the forward until the backward reuses it, i.e. the whole model on every rank of a small
      model; and its buckets are sized for large GPUs. Here they are a few of the model's largest matrices, so a
      rank holds its partition plus the layers in flight.
    """
    from mip_core.modeling.io import stored_dtype

    import torch

    config = json.loads(json.dumps(ds_config))  # a copy
    dtype = stored_dtype(model_config)
    if "bf16" not in config and "fp16" not in config and dtype in (torch.bfloat16, torch.float16):
        config["bf16" if dtype == torch.bfloat16 else "fp16"] = {"enabled": True}
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        largest = _largest_matrix(model_config)
        for key, value in (("stage3_max_live_parameters", 3 * largest), ("stage3_max_reuse_distance", largest),
                           ("stage3_prefetch_bucket_size", largest), ("reduce_bucket_size", largest)):
            zero.setdefault(key, value)
    return config


def _largest_matrix(model_config: dict[str, Any]) -> int:
    """Numbers in the checkpoint's largest weight matrix (an MLP projection or the embedding)."""
    sizes = [1]
    for section in (model_config, model_config.get("text_config") or {}, model_config.get("vision_config") or {}):
        hidden = section.get("hidden_size") or section.get("embed_dim") or 0
        sizes += [hidden * (section.get("intermediate_size") or 0), hidden * (section.get("vocab_size") or 0)]
    return int(max(sizes))


def _fitted_view(config: dict[str, Any]) -> dict[str, Any]:
    zero = config.get("zero_optimization", {})
    keys = ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size")
    return {"bf16": config.get("bf16", {}).get("enabled", False), **{k: zero.get(k) for k in keys}}


def _write_records(summary: Any, spec: EditSpec) -> None:
    """``unlearn.json`` (the edit's summary and lineage) beside the model."""
    from mip_core.editing.unlearn import UNLEARN_LOG

    write_text(_join(spec.output_uri, UNLEARN_LOG),
               json.dumps({**summary.to_dict(), "lineage": spec.lineage}, indent=1, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    from mip_core.progress import log_to_stderr

    log_to_stderr()  # the job's log: the launcher relays these lines to the Prefect run
    parser = argparse.ArgumentParser(prog="python -m mip_core.entrypoints.edit",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--spec", required=True, help="EditSpec JSON (local path or s3:// URI)")
    parser.add_argument("--ds-config", help="DeepSpeed config JSON (default: zero3_config(), spec's stage)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    ds_config = None
    if args.ds_config:
        fs, path = filesystem(args.ds_config)
        with fs.open(path, "r") as f:
            ds_config = json.load(f)
    out = run_edit(spec, ds_config=ds_config)
    print(json.dumps(out), flush=True)
    return 0


def _exit_without_teardown(code: int) -> None:
    """Leave the job once its files and summary are out, without the interpreter's C++ teardown.

    Even after the final barrier and ``destroy_process_group``, a rank of a 2-rank gloo job still aborted at exit
    now and then ("terminate called without an active exception", SIGABRT: a native thread destroyed while
    joinable), and the launcher then failed the whole job whose every file was written. Nothing is left to run
    at that point, so the process flushes its streams and exits with ``os._exit``, which skips that teardown.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_without_teardown(main())
