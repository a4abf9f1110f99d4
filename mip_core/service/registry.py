"""What a model registration may point at: checked and made absolute before anything is stored.

A registration is read later, by other processes on other hosts (a Prefect worker, Ray actors, the edit job's
ranks), often from another working directory. So a relative path is resolved here, once, to an absolute one,
and the model folder and its dataset (or its keep-sets, ``docs/keepsets.md``) are opened now: a typo surfaces at
``mip models register``, not as a batch that fails at planning every night.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mip_core.benchmark import load_benchmark
from mip_core.benchmark.schema import BenchmarkError
from mip_core.errors import InputError, ModelLoadError
from mip_core.modeling.io import check_model_dir
from mip_core.storage import filesystem, is_remote

if TYPE_CHECKING:
    from .store import ServiceStore


def absolute_uri(uri: str) -> str:
    """``s3://...`` as it is; a local path (or ``file://`` URI) as an absolute path."""
    if is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _remote_has(uri: str, name: str, endpoint_url: str | None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return bool(fs.exists(f"{path.rstrip('/')}/{name}"))


def check_model(model_uri: str, endpoint_url: str | None = None) -> str:
    """``model_uri`` made absolute after checking that it holds a saved model; else InputError naming --model."""
    model_uri = absolute_uri(model_uri)
    try:
        if is_remote(model_uri):
            if not _remote_has(model_uri, "config.json", endpoint_url):
                raise ModelLoadError(f"{model_uri} holds no config.json")
        else:
            check_model_dir(model_uri)
    except ModelLoadError as exc:
        raise InputError(f"--model {model_uri}: {exc}; give a folder (or s3:// prefix) written by "
                         "save_pretrained with its processor") from None
    return model_uri


def check_dataset(dataset_uri: str, endpoint_url: str | None = None) -> str:
    """``dataset_uri`` made absolute after checking that it holds a benchmark; else InputError naming --dataset."""
    dataset_uri = absolute_uri(dataset_uri)
    try:
        if is_remote(dataset_uri):
            if not _remote_has(dataset_uri, "manifest.json", endpoint_url):
                raise BenchmarkError(f"{dataset_uri} holds no manifest.json")
        else:
            load_benchmark(dataset_uri)
    except BenchmarkError as exc:
        raise InputError(f"--dataset {dataset_uri}: {exc}; give the dataset folder (or s3:// prefix) the "
                         "model's forget requests are resolved against") from None
    return dataset_uri


def check_sources(model_uri: str, dataset_uri: str, endpoint_url: str | None = None) -> tuple[str, str]:
    """``(model_uri, dataset_uri)`` made absolute, after checking that both can be opened; else InputError
    naming the flag and the fix."""
    return check_model(model_uri, endpoint_url), check_dataset(dataset_uri, endpoint_url)


KEEPSETS_DIR = "keepsets"
TEMPLATES_FILE = "templates.jsonl"


def keepsets_key(name: str, version: str) -> str:
    """``models/<name>/keepsets/<version>``: beside the version folders (not in them: a version folder holds
    the model files only, and is hard-linked or exported as such)."""
    from .store import ServiceStore

    ServiceStore.model_key(name, version)  # validates both
    return f"{ServiceStore.model_key(name)}/{KEEPSETS_DIR}/{version}"


def register_with_keepsets(store: ServiceStore, name: str, model_uri: str, retain: str, utility: str,
                           templates: str | None = None) -> str:
    """Register ``model_uri`` as the next version of ``name`` with the operator's keep-sets instead of a training
    benchmark; returns the version.

    The model and all three files are checked first (one :class:`InputError` lists the problems of every file),
    so a bad keep-set copies nothing. The keep-sets are stored as item tables under :func:`keepsets_key`
    (``retain``, ``utility``) with ``templates.jsonl`` (:data:`~mip_core.service.keepsets.DEFAULT_TEMPLATES`
    without ``templates``), and the version's lineage records their URIs as ``keepsets`` (``dataset_uri``: None).
    """
    from .keepsets import DEFAULT_TEMPLATES, read_keepset, read_templates, templates_jsonl, write_keepset

    model_uri = check_model(model_uri, store.endpoint_url)
    problems: list[str] = []
    parsed: dict[str, Any] = {}
    for flag, value, read in (("--retain", retain, lambda v: read_keepset(v, "retain", store.endpoint_url)),
                              ("--utility", utility, lambda v: read_keepset(v, "utility", store.endpoint_url)),
                              ("--templates", templates, lambda v: read_templates(v, store.endpoint_url))):
        if value is None:
            continue
        try:
            parsed[flag] = read(absolute_uri(value))
        except InputError as exc:
            problems.append(f"{flag}: {exc}")
    if problems:
        raise InputError("\n".join(problems))
    key = keepsets_key(name, store.next_version(name))
    uris = {"retain": write_keepset(store, f"{key}/retain", parsed["--retain"]),
            "utility": write_keepset(store, f"{key}/utility", parsed["--utility"]),
            "templates": store.write_text(f"{key}/{TEMPLATES_FILE}",
                                          templates_jsonl(parsed.get("--templates", DEFAULT_TEMPLATES)))}
    return store.register_model(name, model_uri, dataset_uri=None, keepsets=uris)


__all__ = ["absolute_uri", "check_dataset", "check_model", "check_sources", "keepsets_key",
           "register_with_keepsets"]
