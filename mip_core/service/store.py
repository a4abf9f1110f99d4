"""The service's state under one root URI (a folder or ``s3://bucket/prefix``): queue, batches, models.

Layout::

    requests/<state>/<request_id>.json    RequestRecord; state in pending|claimed|done|failed|rejected
    batches/<batch_id>/...                 manifest, shards, path graph, edit config, logs, edited model
    models/<name>/<version>/               model files + lineage.json + model_card.md
    models/<name>/CURRENT.json             {"version": ..., "published_at": ...}

Why files and no database: the same code runs on a laptop folder and on MinIO/S3, every artifact is
inspectable with ``aws s3 ls``, and the state a batch saw is reproducible from the store alone. Every write is
atomic (a temporary file + ``os.replace`` locally, one single-object PUT on S3), so a reader never sees half a
record. A state change writes the new record first and then deletes the old one, so a crash leaves the request
visible twice (``get`` returns the most advanced state) rather than not at all. Claims happen under a lease with
an expiry (``mip_core.service.lease``), so two runs at once never claim the same request.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError
from pydantic import BaseModel, ValidationError

from mip_core.errors import ArtifactError, InputError
from mip_core.storage import filesystem, is_remote, s3_max_attempts
from mip_core.transfer import link_or_copy, same_store, temp_file_beside, write_atomic

from .images import ingest_images
from .requests import (ID_PATTERN, ID_RULE, STATES, ForgetRequest, RequestRecord, RequestState, check_request_size,
                       iso_utc, utc_now)

_ID = re.compile(ID_PATTERN)
_VERSION = re.compile(r"^v(\d{4,})$")
# get() looks in the most advanced state first: mid-transition a record exists in two folders.
_NEWEST_FIRST: tuple[str, ...] = ("done", "failed", "rejected", "claimed", "pending")
_RANK = {s: i for i, s in enumerate(reversed(_NEWEST_FIRST))}
CURRENT_FILE = "CURRENT.json"
LINEAGE_FILE = "lineage.json"
CARD_FILE = "model_card.md"
_COPY_CHUNK = 16 << 20  # bytes per read while copying model files


class StoreUnavailable(ArtifactError):
    """The store's endpoint could not be reached, after the S3 client's own retries with backoff."""


# What an unreachable endpoint raises through s3fs/botocore (connection refused, timeouts, dropped connections);
# everything else (a missing key, access denied) is a real answer from the server and passes through unchanged.
_UNREACHABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, BotoConnectionError,
                                                 HTTPClientError)
_F = TypeVar("_F", bound=Callable[..., Any])


def _io(fn: _F) -> _F:
    """Turn an unreachable endpoint into one :class:`StoreUnavailable` that names the store, the endpoint and
    the fix (the raw botocore message names only a URL)."""

    @functools.wraps(fn)
    def wrapper(self: ServiceStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except _UNREACHABLE as exc:
            endpoint = self.endpoint_url or os.environ.get("MIP_S3_ENDPOINT_URL") or "the default AWS endpoint"
            raise StoreUnavailable(
                f"the service store {self.root} is unreachable at {endpoint} ({fn.__name__.strip('_')}): "
                f"{type(exc).__name__}: {exc}. The S3 client retried {s3_max_attempts()} times with backoff; "
                "check that the server is up and MIP_S3_ENDPOINT_URL / AWS_* are right. A Prefect step retries "
                "this on its own; nothing was changed by the failed call") from exc

    return wrapper  # type: ignore[return-value]


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InputError(f"{what}={value!r} is not a valid id: use {ID_RULE}")
    return value


class ServiceStore:
    """Queue, batch artifacts and model registry of the unlearning service under ``root``."""

    def __init__(self, root: str, endpoint_url: str | None = None) -> None:
        if not root:
            raise InputError("root is empty: give a folder or an s3://bucket/prefix URI")
        self.remote = is_remote(root)
        self.endpoint_url = endpoint_url
        self.fs, path = filesystem(root, endpoint_url)
        self._base = path.rstrip("/")
        if self.remote:
            self._scheme = root.split("://", 1)[0]
            self.root = f"{self._scheme}://{self._base}"
        else:
            self._base = os.path.abspath(self._base)
            self.root = self._base
        self._bucket_checked = False

    def __repr__(self) -> str:
        return f"ServiceStore({self.root!r})"

    # ---- keys and raw I/O ----------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        key = key.strip("/")
        if any(part in ("..", ".") for part in key.split("/")) or "\\" in key:
            raise InputError(f"storage key {key!r} may not contain '.', '..' or '\\' parts")
        return f"{self._base}/{key}" if key else self._base

    def uri(self, key: str = "") -> str:
        """Full URI of ``key``: an absolute local path, or ``s3://bucket/prefix/key``."""
        path = self._path(key)
        return f"{self._scheme}://{path}" if self.remote else path

    def _ensure_bucket(self) -> None:
        """Create the bucket on first write if it does not exist (a fresh MinIO has none)."""
        if not self.remote or self._bucket_checked:
            return
        bucket = self._base.split("/", 1)[0]
        try:
            if not self.fs.exists(bucket):
                self.fs.mkdir(bucket)
        except PermissionError:  # credentials that may write objects but not list/create buckets: just write
            pass
        self._bucket_checked = True

    @_io
    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically; returns the URI."""
        path = self._path(key)
        if self.remote:
            self._ensure_bucket()
            self.fs.pipe(path, data)  # one PUT: readers see the old object or the new one
            return self.uri(key)
        write_atomic(path, data)
        return path

    @_io
    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there yet; False if something is (exactly one of
        several racing writers gets True). Locally a hard link of a finished temporary file (``link`` fails
        on an existing name); on S3 a conditional PUT (``If-None-Match: *``)."""
        path = self._path(key)
        if self.remote:
            self._ensure_bucket()
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        tmp = temp_file_beside(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    @_io
    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactError(f"{self.uri(key)} does not exist in the service store {self.root}") from None

    def write_text(self, key: str, text: str) -> str:
        return self.write_bytes(key, text.encode("utf-8"))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_json(self, key: str, obj: Any) -> str:
        """Write ``obj`` (JSON-able, or a pydantic model) as indented JSON; returns the URI."""
        if isinstance(obj, BaseModel):
            obj = obj.model_dump(mode="json")
        return self.write_text(key, json.dumps(obj, indent=1, default=str) + "\n")

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_text(key))

    @_io
    def exists(self, key: str) -> bool:
        path = self._path(key)
        if self.remote:
            self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    @_io
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    @_io
    def _list(self, key: str) -> list[str]:
        """Full paths directly under ``key`` (files and folders); empty if it does not exist."""
        path = self._path(key)
        if self.remote:
            self.fs.invalidate_cache(path)
        try:
            return sorted(p.rstrip("/") for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    # ---- request queue -------------------------------------------------------------------------------------

    @staticmethod
    def _record_key(state: str, request_id: str) -> str:
        return f"requests/{state}/{request_id}.json"

    @_io
    def _read_record(self, state: str, request_id: str) -> RequestRecord | None:
        key = self._record_key(state, request_id)
        try:
            raw = self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        return self._parse_record(raw, self.uri(key))

    @staticmethod
    def _parse_record(raw: bytes, uri: str) -> RequestRecord:
        try:
            return RequestRecord.model_validate_json(raw)
        except ValidationError as exc:
            raise ArtifactError(f"{uri} is not a valid request record ({exc.error_count()} problems: "
                                f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}); fix or move the file"
                                ) from None

    def _write_record(self, record: RequestRecord) -> str:
        return self.write_json(self._record_key(record.state, record.request_id), record)

    def _find(self, request_id: str) -> RequestRecord | None:
        for state in _NEWEST_FIRST:
            if self.remote:
                self.fs.invalidate_cache(self._path(f"requests/{state}"))
            record = self._read_record(state, request_id)
            if record is not None:
                return record
        return None

    def submit(self, req: ForgetRequest, *, base_dir: str | None = None) -> RequestRecord:
        """Queue ``req`` as pending. A request id already used, in any state, is an :class:`InputError`.

        Image files of its items are validated and copied under ``uploads/<request_id>/`` first (relative paths
        from ``base_dir``, e.g. the request file's folder); a bad image is an :class:`InputError` listing every
        bad ``items[k].image``, and then nothing is written.
        """
        existing = self._find(req.request_id)
        if existing is not None:
            raise InputError(f"request_id={req.request_id!r} already exists (state {existing.state}, "
                             f"submitted {iso_utc(existing.submitted_at)}); omit request_id to get a fresh one, "
                             "or choose another")
        check_request_size(len(req.model_dump_json().encode()))  # the API path skips parse_request
        req = ingest_images(self, req, base_dir)
        record = RequestRecord(request=req, state="pending", submitted_at=utc_now())
        self._write_record(record)
        return record

    def check_target(self, req: ForgetRequest) -> None:
        """Refuse a request for a model this store does not serve (the CLI and the submit flow call this; a
        batch would otherwise fail on it hours later)."""
        known = self.models()
        if req.target_model not in known:
            raise InputError(f"target_model={req.target_model!r} is not a registered model in {self.root} "
                             f"(registered: {known or 'none'}); fix the name, or register the model first with "
                             "`mip models register`")
        if req.target_version is not None and req.target_version not in (versions := self.versions(req.target_model)):
            raise InputError(f"target_version={req.target_version!r} is not a version of {req.target_model} "
                             f"(versions: {', '.join(versions)}); fix it, or leave it out to mean the current one "
                             "(`mip models list` shows them)")

    def get(self, request_id: str) -> RequestRecord:
        check_id(request_id, "request_id")
        record = self._find(request_id)
        if record is None:
            raise InputError(f"request_id={request_id!r} is not in the service store {self.root}; "
                             "`mip requests` lists the known ones")
        return record

    def record_uri(self, record: RequestRecord) -> str:
        return self.uri(self._record_key(record.state, record.request_id))

    def list(self, state: RequestState | None = None, target_model: str | None = None) -> list[RequestRecord]:
        """Records in ``state`` (default: all), optionally of one target model, by (submitted_at, id)."""
        if state is not None and state not in STATES:
            raise InputError(f"state={state!r} is not valid; use one of {list(STATES)}")
        by_id: dict[str, RequestRecord] = {}
        for st in (state,) if state else STATES:
            paths = [p for p in self._list(f"requests/{st}") if p.endswith(".json")]
            if not paths:
                continue
            blobs = self._cat_many(paths)
            for p in paths:
                raw = blobs.get(p)
                if raw is None:  # deleted between ls and cat: it moved on to the next state
                    continue
                rec = self._parse_record(raw, f"{self._scheme}://{p}" if self.remote else p)
                old = by_id.get(rec.request_id)
                if old is None or _RANK[rec.state] > _RANK[old.state]:
                    by_id[rec.request_id] = rec
        out = [r for r in by_id.values() if target_model is None or r.request.target_model == target_model]
        return sorted(out, key=lambda r: (r.submitted_at, r.request_id))

    @_io
    def _cat_many(self, paths: list[str]) -> dict[str, bytes | None]:
        """Contents of ``paths`` (concurrent GETs on S3); None for a file that vanished meanwhile."""
        if self.remote:
            blobs = self.fs.cat(paths, on_error="return")
            return {p: None if isinstance(blobs.get(p), BaseException) else blobs.get(p) for p in paths}
        out: dict[str, bytes | None] = {}
        for p in paths:
            try:
                out[p] = self.fs.cat_file(p)
            except FileNotFoundError:
                out[p] = None
        return out

    def _move(self, old: RequestRecord, **update: Any) -> RequestRecord:
        new = RequestRecord.model_validate({**old.model_dump(), **update})
        self._write_record(new)
        if new.state != old.state:
            self.delete(self._record_key(old.state, old.request_id))
        return new

    def claim(self, request_ids: Sequence[str], batch_id: str) -> list[RequestRecord]:
        """Move pending requests to claimed for ``batch_id``; ids not pending (any more) are skipped."""
        check_id(batch_id, "batch_id")
        out: list[RequestRecord] = []
        for rid in request_ids:
            check_id(rid, "request_id")
            record = self._read_record("pending", rid)
            if record is None or record.state != "pending":
                continue
            out.append(self._move(record, state="claimed", claimed_at=utc_now(), batch_id=batch_id))
        return out

    def finish(
        self,
        request_id: str,
        state: Literal["done", "failed", "rejected"],
        *,
        reason: str | None = None,
        model_version: str | None = None,
        report_uri: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> RequestRecord:
        """Close a claimed (or pending) request as done, failed or rejected: its terminal record."""
        if state not in ("done", "failed", "rejected"):
            raise InputError(f"state={state!r}: a request finishes as 'done', 'failed' or 'rejected'")
        record = self.get(request_id)
        if record.state not in ("claimed", "pending"):
            raise InputError(f"request {request_id!r} is already {record.state} ({self.record_uri(record)}); "
                             "only pending or claimed requests can finish")
        return self._move(record, state=state, finished_at=utc_now(), reason=reason,
                          model_version=model_version, report_uri=report_uri, metrics=metrics)

    def release(self, request_id: str) -> RequestRecord:
        """Put a claimed request back in the queue (its batch did not finish it); pending stays pending."""
        record = self.get(request_id)
        if record.state == "pending":
            return record
        if record.state != "claimed":
            raise InputError(f"request {request_id!r} is {record.state}; only claimed requests can be "
                             "released")
        return self._move(record, state="pending", claimed_at=None, batch_id=None)

    def move_to_batch(self, request_id: str, batch_id: str) -> RequestRecord:
        """Move a claimed request into another batch of the same run (a held-back batch split for a retry); the
        batch it leaves is appended to ``held_back_in``, so the record shows every batch it was in."""
        check_id(batch_id, "batch_id")
        record = self.get(request_id)
        if record.state != "claimed":
            raise InputError(f"request {request_id!r} is {record.state}; only claimed requests move between batches")
        return self._move(record, batch_id=batch_id, claimed_at=utc_now(),
                          held_back_in=[*record.held_back_in, str(record.batch_id)])

    # ---- batches -------------------------------------------------------------------------------------------

    @staticmethod
    def new_batch_id() -> str:
        """``b<UTC %Y%m%d-%H%M%S>-<6 hex>``: sorts by time, unique across concurrent starts, and lowercase, so the
        Prefect artifact keys made from it (lowercase only) still contain it verbatim for an API filter."""
        return f"b{utc_now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"

    @staticmethod
    def batch_key(batch_id: str, *parts: str) -> str:
        check_id(batch_id, "batch_id")
        return "/".join(["batches", batch_id, *(p.strip("/") for p in parts if p)])

    # ---- model registry ------------------------------------------------------------------------------------

    @staticmethod
    def model_key(name: str, version: str | None = None) -> str:
        check_id(name, "model name")
        if version is None:
            return f"models/{name}"
        if not _VERSION.match(version):
            raise InputError(f"version={version!r} is not a model version; versions look like 'v0001'")
        return f"models/{name}/{version}"

    def models(self) -> list[str]:
        """Names of registered models."""
        return [p.rsplit("/", 1)[-1] for p in self._list("models") if _ID.fullmatch(p.rsplit("/", 1)[-1])]

    def versions(self, name: str) -> list[str]:
        """Version folders of model ``name``, oldest first."""
        names = [p.rsplit("/", 1)[-1] for p in self._list(self.model_key(name))]
        return sorted((v for v in names if _VERSION.match(v)), key=lambda v: int(v[1:]))

    def next_version(self, name: str) -> str:
        existing = self.versions(name)
        return f"v{(int(existing[-1][1:]) + 1 if existing else 1):04d}"

    def current_version(self, name: str) -> str | None:
        key = f"{self.model_key(name)}/{CURRENT_FILE}"
        if not self.exists(key):
            return None
        return str(self.read_json(key)["version"])

    def set_current(self, name: str, version: str, **extra: Any) -> str:
        """Point ``models/<name>/CURRENT.json`` at ``version`` (one atomic write); returns its URI."""
        self.model_key(name, version)
        if version not in self.versions(name):
            raise InputError(f"model {name!r} has no version {version!r} (has {self.versions(name)}); "
                             "register it first")
        pointer = {"version": version, "published_at": iso_utc(utc_now()), **extra}
        return self.write_json(f"{self.model_key(name)}/{CURRENT_FILE}", pointer)

    @_io
    def _copy_tree(self, source_uri: str, dest_key: str) -> dict[str, int]:
        """Copy every file under ``source_uri`` (a folder or fsspec URI) to ``dest_key``; returns how many files
        went each way (``link``, ``copy``, ``server-copy``, ``stream``).

        No tensor bytes pass through this process where storage allows: a folder inside this store (a batch's
        edited model, another version) is hard-linked (the store replaces files, never rewrites them in place);
        an object on the same object store is copied by the server (S3 CopyObject). An outside local folder is
        streamed in chunks (a later in-place save_pretrained there must not change a registered version).
        """

        src_fs, src = filesystem(source_uri, self.endpoint_url)
        src = src.rstrip("/")
        if not src_fs.isdir(src):
            raise InputError(f"model source {source_uri!r} is not a folder (or prefix) with model files")
        files = [f for f in src_fs.find(src) if not any(p.startswith(".tmp-") for p in f[len(src):].split("/"))]
        if not files:
            raise InputError(f"model source {source_uri!r} is empty")
        if self.remote:
            self._ensure_bucket()
        server_side = same_store(source_uri, self.root)
        linkable = not self.remote and not is_remote(source_uri) and os.path.abspath(src).startswith(self._base + "/")
        counts: dict[str, int] = {}
        for f in files:
            rel = f[len(src):].lstrip("/")
            dest = self._path(f"{dest_key}/{rel}")
            if server_side:
                self.fs.copy(f, dest)
                how = "server-copy"
            elif linkable:
                how = "link" if link_or_copy(f, dest) else "copy"
            else:
                if not self.remote:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                with src_fs.open(f, "rb") as r, self.fs.open(dest, "wb") as w:
                    shutil.copyfileobj(r, w, _COPY_CHUNK)
                how = "stream"
            counts[how] = counts.get(how, 0) + 1
        return counts

    def register_model(
        self,
        name: str,
        source_uri: str,
        *,
        dataset_uri: str | None,
        keepsets: dict[str, str] | None = None,
        card: str = "",
        lineage: dict[str, Any] | None = None,
    ) -> str:
        """Copy a model folder into ``models/<name>/<next version>/`` with lineage and card; make it CURRENT.

        What the model must keep knowing is either a benchmark (``dataset_uri``) or the operator's keep-sets
        (``keepsets``: ``{"retain": uri, "utility": uri, "templates": uri}`` of item tables and a templates file,
        ``docs/keepsets.md``), recorded in the lineage as given. ``lineage`` keys (``parent_version``,
        ``batch_id``, ``requests``, ``path_graph``, ...) are recorded as given; ``parent_version`` defaults to
        the version that was current. Returns the new version.
        """
        self.model_key(name)
        if dataset_uri is None and keepsets is None:
            raise InputError(f"model {name!r}: give dataset_uri (a benchmark) or keepsets (retain, utility, "
                             "templates URIs): the service needs to know what the model must keep knowing")
        if keepsets is not None and not (isinstance(keepsets, dict) and {"retain", "utility"} <= set(keepsets)
                                         and all(isinstance(v, str) for v in keepsets.values())):
            raise InputError(f"keepsets={keepsets!r}: expected "
                             "{'retain': uri, 'utility': uri, 'templates': uri}")
        parent = self.current_version(name)
        version = self.next_version(name)
        key = self.model_key(name, version)
        copied = self._copy_tree(source_uri, key)
        record: dict[str, Any] = {
            "name": name, "version": version, "uri": self.uri(key), "source_uri": source_uri,
            "dataset_uri": dataset_uri, "parent_version": parent, "registered_at": iso_utc(utc_now()),
            "n_files": sum(copied.values()), "copied": copied,
            **({"keepsets": dict(keepsets)} if keepsets is not None else {}), **(lineage or {}),
        }
        self.write_json(f"{key}/{LINEAGE_FILE}", record)
        self.write_text(f"{key}/{CARD_FILE}", (card or _default_card(record)) + self._usage(key, record))
        self.set_current(name, version)
        return version

    def _usage(self, key: str, record: dict[str, Any]) -> str:
        """The card's "Usage" section: the lines that load the version with plain transformers, and a prompt."""
        from mip_core.adapters import ARCHITECTURES, adapter_class  # the adapter registry imports torch: only here

        config_key = f"{key}/config.json"
        model_type = self.read_json(config_key).get("model_type") if self.exists(config_key) else None
        if model_type not in ARCHITECTURES:
            return ""
        from mip_core.modeling.shards import MANIFEST

        where = record["uri"] if not self.remote else f"path/to/a/download/of/{record['name']}-{record['version']}"
        export = ""
        if self.exists(f"{key}/{MANIFEST}"):  # a neuron-delta version: plain transformers needs an export first
            where = f"exports/{record['name']}-{record['version']}"
            export = ("This version is stored as its base's files plus the edited neurons' rows and columns "
                      "(`neuron_deltas.json`); transformers alone refuses the folder rather than load the weights "
                      "from before the edit. Write a plain checkpoint first:\n\n```bash\n"
                      f"mip models export {record['name']} --version {record['version']} --out {where}\n```\n\n")
        return "\n## Usage\n\n" + export + adapter_class(model_type).usage_snippet(where)

    def version_of_batch(self, name: str, batch_id: str) -> str | None:
        """The version of ``name`` whose lineage records ``batch_id`` (a batch publishes at most one), or None."""
        for version in self.versions(name):
            key = f"{self.model_key(name, version)}/{LINEAGE_FILE}"
            if self.exists(key) and self.read_json(key).get("batch_id") == batch_id:
                return version
        return None

    def model_info(self, name: str, version: str | None = None) -> dict[str, Any]:
        """``lineage.json`` of ``version`` (default: the current one) of model ``name``."""
        check_id(name, "model name")
        versions = self.versions(name)
        if not versions:
            raise InputError(f"model {name!r} is not registered in {self.root}; known models: "
                             f"{self.models() or 'none'}")
        version = version or self.current_version(name)
        if version is None:
            raise InputError(f"model {name!r} has no CURRENT version (versions {versions}); "
                             "publish one with set_current")
        if version not in versions:
            raise InputError(f"model {name!r} has no version {version!r}; it has {versions}")
        return dict(self.read_json(f"{self.model_key(name, version)}/{LINEAGE_FILE}"))


def _default_card(lineage: dict[str, Any]) -> str:
    lines = [f"# {lineage['name']} {lineage['version']}", "",
             "Registered by the MIP-Editor unlearning service.", ""]
    for key in ("parent_version", "batch_id", "dataset_uri", "source_uri", "path_graph", "registered_at"):
        if lineage.get(key) is not None:
            lines.append(f"- {key}: {lineage[key]}")
    for kind, uri in (lineage.get("keepsets") or {}).items():
        lines.append(f"- keep-set {kind}: {uri}")
    requests = lineage.get("requests")
    if requests:
        lines.append(f"- forgotten requests: {', '.join(map(str, requests))}")
    return "\n".join(lines) + "\n"


__all__ = ["CARD_FILE", "CURRENT_FILE", "LINEAGE_FILE", "ServiceStore", "StoreUnavailable", "check_id"]
