"""Load and save models with ``from_pretrained`` / ``save_pretrained`` + safetensors, locally or via fsspec.

The same path serves a tiny model built here and a real checkpoint (a local folder or an ``s3://`` prefix): the
adapter is chosen from ``config.json``'s ``model_type``, and the adapter names the model and processor classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mip_core.adapters import ModelAdapter, adapter_class
from mip_core.errors import ModelLoadError
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
    """A local folder holding ``uri``'s files: the folder itself, or a cached download of a remote prefix."""
    if not is_remote(uri):
        return uri.removeprefix("file://")
    fs, path = filesystem(uri, endpoint_url)
    if not fs.exists(path):
        raise ModelLoadError(f"model URI {uri} does not exist; check the bucket/prefix and MIP_S3_ENDPOINT_URL")
    local = cache_dir() / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    return str(local)


def check_model_dir(path: str) -> dict[str, Any]:
    """Validate a model folder and return its ``config.json``; the error lists every missing file."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist; build one with `mip model tiny --out {path}` "
                             "or `mip vanilla`, or pass a folder written by save_pretrained")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
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


def load_model(uri: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               endpoint_url: str | None = None) -> LoadedModel:
    """Load model, processor and adapter from a local folder or an fsspec URI (e.g. ``s3://bucket/model``)."""
    local = localize(uri, endpoint_url)
    config = check_model_dir(local)
    cls = adapter_class(config.get("model_type", "<missing model_type>"))
    model = cls.model_class.from_pretrained(local, dtype=dtype or torch.float32)
    model.to(device).eval()
    processor = cls.load_processor(local)
    return LoadedModel(model, processor, cls(model), local)


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
