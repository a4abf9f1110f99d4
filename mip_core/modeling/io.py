"""Load and save models with ``from_pretrained`` / ``save_pretrained`` + safetensors, locally or via fsspec.

The same path serves a tiny model built here and a real checkpoint (a local folder or an ``s3://`` prefix): the
adapter is chosen from ``config.json``'s ``model_type``, and the adapter names the model and processor classes.
Every stage loads through :func:`load_model`: the checkpoint's stored dtype, no float32 copy, each weight read
straight onto its device, one model optionally spread over several GPUs (docs/scale.md, "Loading"). A
neuron-delta version (:mod:`mip_core.modeling.deltas`) loads as its base weights with its deltas applied.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mip_core.adapters import ModelAdapter, adapter_class
from mip_core.errors import InputError, ModelLoadError
from mip_core.modeling.deltas import apply_deltas, plain_view
from mip_core.modeling.shards import MANIFEST
from mip_core.storage import filesystem, is_remote

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, its processor, and the adapter that maps its sites."""

    model: nn.Module
    processor: Any
    adapter: ModelAdapter
    path: str  # the local folder it was read from


def cache_dir() -> Path:
    return Path(os.environ.get("MIP_CACHE_DIR", Path.home() / ".cache" / "mip"))


def localize(uri: str, endpoint_url: str | None = None) -> str:
    """A local folder holding ``uri``'s files: the folder itself, or a download of a remote prefix.

    A download happens once per host and content: into a private temporary folder, renamed into place under a
    file lock, in a folder named by the URI and a fingerprint of the remote listing (names, sizes, ETags). So a
    changed model gets a new folder, two processes on one host never download into the same folder, and no file
    a loaded model maps is ever rewritten: a model loaded on the CPU maps its safetensors, and rewriting one in
    place changes that model's weights (truncating it even reverts rows a neuron delta was applied to).
    """
    if not is_remote(uri):
        return uri.removeprefix("file://")
    fs, root = filesystem(uri, endpoint_url)
    root = root.rstrip("/")
    listing = fs.find(root, detail=True)
    if not listing:
        raise ModelLoadError(f"{uri} does not exist or is empty; check the bucket/prefix and MIP_S3_ENDPOINT_URL")
    entries = sorted((p[len(root) + 1:], int(info.get("size") or 0), str(info.get("ETag") or info.get("mtime")))
                     for p, info in listing.items())
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    fingerprint = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:12]
    base = cache_dir() / "models"
    base.mkdir(parents=True, exist_ok=True)
    target = base / f"{key}-{fingerprint}"
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per host at a time; released when the file closes
        if not target.is_dir():
            tmp = base / f"{target.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier download by a process of the same pid
            for rel, _, _ in entries:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(tmp / rel))
            os.replace(tmp, target)
    return str(target)


def check_model_dir(path: str) -> dict[str, Any]:
    """Validate a model folder and return its ``config.json``; the error lists every missing file."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist; build one with `mip model tiny --out {path}` "
                             "or `mip vanilla`, or pass a folder written by save_pretrained")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in (*WEIGHT_FILES, MANIFEST)):
        missing.append(" or ".join(WEIGHT_FILES) + " (safetensors weights)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if not any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        missing.append("processor_config.json or preprocessor_config.json")
    if missing:
        raise ModelLoadError(f"model folder {path} is incomplete, missing: {'; '.join(missing)}. "
                             "Save the model and its processor with save_model() (or save_pretrained on both).")
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON ({exc}); re-save the model") from exc


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The weight dtypes a stage may ask for by name (``ServiceSpec.dtype``); "auto" keeps the checkpoint's."""


def stored_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The weight dtype ``config.json`` records (``dtype``, or ``torch_dtype`` before transformers 5).

    float32 when it records none: the tiny models built here are float32 and must stay so. (transformers' own
    "auto" would read the first tensor of the weights instead.)
    """
    for section in (config, config.get("text_config") or {}):
        name = section.get("dtype") or section.get("torch_dtype")
        if name:
            dtype = DTYPES.get(str(name).removeprefix("torch."))
            if dtype is None:
                raise ModelLoadError(f"config.json stores weights as {name!r}; supported: {', '.join(DTYPES)}. "
                                     "Pass dtype= explicitly to load it in one of these")
            return dtype
    return torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, config: Mapping[str, Any]) -> torch.dtype:
    """``dtype`` as a torch dtype: a torch dtype as is, a name from :data:`DTYPES`, or "auto"/None -> stored."""
    if dtype is None or dtype == "auto":
        return stored_dtype(config)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InputError(f"dtype must be 'auto', one of {', '.join(DTYPES)} or a torch.dtype; got {dtype!r}")


def _placement(device: str | torch.device, device_map: str | dict[str, Any] | None,
               max_memory: dict[Any, Any] | None) -> dict[str, Any]:
    """``from_pretrained`` keywords that load each weight straight onto its device (none: load, then move).

    ZeRO-3 partitions parameters while they are built, which excludes a device map; the model is then moved
    after loading, as before.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if device_map is not None:
        # a copy: transformers rewrites max_memory's values in place
        return {"device_map": device_map, "max_memory": dict(max_memory) if max_memory is not None else None}
    if is_deepspeed_zero3_enabled() or torch.device(device).type == "cpu":
        return {}
    return {"device_map": {"": torch.device(device)}}


def _check_fit(model: nn.Module, max_memory: dict[Any, Any] | None, uri: str) -> None:
    """Fail when a ``max_memory`` placement left weights off the listed devices (offloaded to cpu or disk)."""
    if max_memory is None:
        return
    placed = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    outside = sorted(placed - {str(k) for k in max_memory})
    if outside:
        raise ModelLoadError(f"model {uri} does not fit in max_memory={max_memory}: weights were placed on "
                             f"{', '.join(outside)}. Give the stage more devices (gpus_per_actor) or memory")


def load_model(uri: str, *, dtype: torch.dtype | str | None = "auto", device: str | torch.device = "cpu",
               device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None,
               endpoint_url: str | None = None) -> LoadedModel:
    """Load model, processor and adapter from a local folder or an fsspec URI (e.g. ``s3://bucket/model``).

    The one loading path of every stage. Weights keep the checkpoint's stored dtype unless ``dtype`` says
    otherwise ("auto"/None: config.json's ``dtype``, float32 when it records none; or "float32", "bfloat16",
    "float16", or a torch dtype). transformers builds the model on the meta device and reads each tensor from
    the (memory-mapped) safetensors in that dtype, so no float32 copy of a bf16 checkpoint is ever made.

    Args:
        device: where the whole model goes; loaded straight there (a device map of one device).
        device_map: instead of ``device``, a transformers/accelerate device map, e.g. "auto" with
            ``max_memory={0: "70GiB", 1: "70GiB"}`` to spread one model over an actor's GPUs. Weights that do
            not fit on the devices listed in ``max_memory`` raise instead of being offloaded.
    """
    if max_memory is not None and device_map is None:
        raise InputError("max_memory only applies with a device_map (e.g. device_map='auto')")
    local = localize(uri, endpoint_url)
    config = check_model_dir(local)
    cls = adapter_class(config.get("model_type", "<missing model_type>"))
    placement = _placement(device, device_map, max_memory)
    with plain_view(local) as view:  # a neuron-delta version: its base weights under their plain names
        model = cls.model_class.from_pretrained(view, dtype=resolve_dtype(dtype, config), **placement)
    if device_map is None:
        model.to(device)  # a no-op when the one-device map already put it there
    _check_fit(model, max_memory, uri)
    apply_deltas(model, local)
    model.eval()
    processor = cls.load_processor(local)
    return LoadedModel(model, processor, cls(model), local)


def load_zero3(uri: str, *, rank: int, endpoint_url: str | None = None) -> LoadedModel:
    """Load for a ZeRO-3 job (call it while the job's ``HfDeepSpeedConfig`` is alive): the model is built
    partitioned inside ``zero.Init`` without initialising weights, then every rank reads only its own slice of
    each tensor (:func:`mip_core.modeling.shards.fill_partitions`), in the checkpoint's stored dtype."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from mip_core.modeling.shards import fill_partitions

    local = localize(uri, endpoint_url)
    config = check_model_dir(local)
    cls = adapter_class(config.get("model_type", "<missing model_type>"))
    with no_init_weights(), _no_zero3_weight_init():  # every weight is read from the checkpoint next
        model = cls.model_class._from_config(AutoConfig.from_pretrained(local), dtype=resolve_dtype("auto", config))
    fill_partitions(model, local, rank)
    apply_deltas(model, local)
    model.eval()
    return LoadedModel(model, cls.load_processor(local), cls(model), local)


@contextmanager
def _no_zero3_weight_init() -> Iterator[None]:
    """Skip transformers' ZeRO-3 weight initialisation in ``_from_config``; the checkpoint fills every weight.

    Why: under ZeRO-3 ``_from_config`` calls ``initialize_weights_zero3``, which gathers every module with its
    children's weights (an MLP's three matrices at once), initialises them on rank 0 and broadcasts them back:
    a whole-model all-gather and broadcast of numbers that are overwritten next (measured on the 0.5 B bench
    model, 2 ranks: each rank's memory after loading 1017 -> 901 MiB, loading 17 -> 7 s). transformers has no
    switch for it, so the module attribute it looks up is replaced for the length of the call.
    """
    import transformers.integrations.deepspeed as hf_deepspeed

    original = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if original is None:  # another transformers version: nothing to skip
        yield
        return
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original


def save_model(model: nn.Module, processor: Any, uri: str, *, endpoint_url: str | None = None) -> str:
    """Write weights (safetensors), config and processor to a local folder or an fsspec URI; returns ``uri``."""
    if not is_remote(uri):
        out = Path(uri.removeprefix("file://"))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, processor, tmp)
        fs, path = filesystem(uri, endpoint_url)
        fs.put(tmp.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    return uri
