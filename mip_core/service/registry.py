"""What a model registration may point at: checked and made absolute before anything is stored.

A registration is read later, by other processes on other hosts (a Prefect worker, Ray actors, the edit job's
ranks), often from another working directory. So a relative path is resolved here, once, to an absolute one,
and the model folder and its dataset are opened now: a typo surfaces at ``mip models register``, not as a batch
that fails at planning every night.
"""

from __future__ import annotations

from pathlib import Path

from mip_core.benchmark import load_benchmark
from mip_core.benchmark.schema import BenchmarkError
from mip_core.errors import InputError, ModelLoadError
from mip_core.modeling.io import check_model_dir
from mip_core.storage import filesystem, is_remote


def absolute_uri(uri: str) -> str:
    """``s3://...`` as it is; a local path (or ``file://`` URI) as an absolute path."""
    if is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _remote_has(uri: str, name: str, endpoint_url: str | None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return bool(fs.exists(f"{path.rstrip('/')}/{name}"))


def check_sources(model_uri: str, dataset_uri: str, endpoint_url: str | None = None) -> tuple[str, str]:
    """``(model_uri, dataset_uri)`` made absolute, after checking that both can be opened; else InputError
    naming the flag and the fix."""
    model_uri, dataset_uri = absolute_uri(model_uri), absolute_uri(dataset_uri)
    try:
        if is_remote(model_uri):
            if not _remote_has(model_uri, "config.json", endpoint_url):
                raise ModelLoadError(f"{model_uri} holds no config.json")
        else:
            check_model_dir(model_uri)
    except ModelLoadError as exc:
        raise InputError(f"--model {model_uri}: {exc}; give a folder (or s3:// prefix) written by "
                         "save_pretrained with its processor") from None
    try:
        if is_remote(dataset_uri):
            if not _remote_has(dataset_uri, "manifest.json", endpoint_url):
                raise BenchmarkError(f"{dataset_uri} holds no manifest.json")
        else:
            load_benchmark(dataset_uri)
    except BenchmarkError as exc:
        raise InputError(f"--dataset {dataset_uri}: {exc}; give the dataset folder (or s3:// prefix) the "
                         "model's forget requests are resolved against") from None
    return model_uri, dataset_uri


__all__ = ["absolute_uri", "check_sources"]
