"""Item tables (``mip-items/1``): the service's own store format for a set of questions, with their images.

A benchmark folder (``mip-bench/1``) describes fictitious people the model was trained on; an operator of a real
model has none, only plain files of facts to keep (``mip_core.service.keepsets``). Those files are validated
once and written here in the same row format the benchmark uses (:data:`ITEMS_SCHEMA` columns, so every reader
of items works on both), plus the images they name, copied in and named by content. Layout (``docs/keepsets.md``)::

    KEY/
      items.parquet      # ITEMS_SCHEMA columns; parquet metadata mip.schema = "mip-items/1"
      subjects.json      # optional {subject_id: name}: whom the retain items are about
      images/<sha256[:16]>.<png|jpg|webp>
      itemset.json       # {"schema", "files": {relpath: sha256}, "counts": {kind: n}}: written LAST

A reader that finds no ``itemset.json`` sees no table: a crash mid-write never passes for a finished one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mip_core.benchmark import Benchmark, load_benchmark
from mip_core.benchmark.schema import (ITEMS_SCHEMA, KINDS, BenchmarkError, BenchmarkImageError,
                                       BenchmarkSchemaError, Item, table_schema_version)
from mip_core.errors import InputError
from mip_core.parquet_io import parquet_bytes

from .images import check_image_bytes

if TYPE_CHECKING:
    from .store import ServiceStore

ITEMS_SCHEMA_VERSION = "mip-items/1"
ITEMSET_FILE = "itemset.json"
ITEMS_FILE = "items.parquet"
SUBJECTS_FILE = "subjects.json"
IMAGES_DIR = "images"
TABLE_SCHEMA = ITEMS_SCHEMA.with_metadata({b"mip.schema": ITEMS_SCHEMA_VERSION.encode()})
"""The benchmark's item columns and types, stamped with this format's version instead of ``mip-bench/1``."""
REWRITE_HINT = ("write it again (`mip models register ... --retain R --utility U`, or "
                "mip_core.service.keepsets.ingest_keepset)")


class ItemTableError(BenchmarkSchemaError):
    """An item table is missing, half-written, of another schema version or modified. A :class:`BenchmarkError`,
    so code that opens "a dataset" handles both kinds alike."""


def image_relpath(data: bytes, ext: str) -> str:
    """``images/<sha256[:16]>.<ext>``: a name from the content, so one picture used by many rows is stored once
    and two different pictures never collide."""
    return f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()[:16]}.{ext}"


def _safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] == IMAGES_DIR and parts[1] not in ("", ".", "..") and "\\" not in rel


def _parquet_bytes(items: Sequence[Item]) -> bytes:
    rows = [it.to_row() for it in items]
    table = pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)
    return parquet_bytes(table, "snappy")


def write_item_table(store: ServiceStore, key: str, items: Sequence[Item], images: Mapping[str, bytes], *,
                     subjects: Mapping[str, str] | None = None) -> str:
    """Write ``items`` and their ``images`` (relpath -> PNG/JPEG/WebP bytes) as an item table at ``key`` of
    ``store``; returns its URI. ``subjects`` ({subject_id: name}) is kept in ``subjects.json``.

    Everything is checked before the first byte is written (an item whose image is not in ``images``, an image
    no item uses, a path outside ``images/``, a duplicate item id, bytes that are not an image): a bad call leaves
    the store as it was. ``itemset.json`` goes last, and an old one is removed first, so a reader sees the old
    table, no table, or the new one, never a mix.
    """
    items = tuple(items)
    problems: list[str] = []
    seen: set[str] = set()
    for it in items:
        if it.item_id in seen:
            problems.append(f"item {it.item_id!r}: the item id is used twice; item ids must be unique")
        seen.add(it.item_id)
        if it.image is not None and it.image not in images:
            problems.append(f"item {it.item_id!r}: its image {it.image!r} is not among the images given")
    used = {it.image for it in items if it.image is not None}
    for rel, data in images.items():
        if not _safe_relpath(rel):
            problems.append(f"image {rel!r}: image paths are {IMAGES_DIR}/<name> (one level, no '..')")
        elif rel not in used:
            problems.append(f"image {rel!r}: no item uses it; pass only the items' images")
        else:
            try:
                check_image_bytes(data, f"image {rel!r}")
            except InputError as exc:
                problems.append(str(exc))
    if subjects is not None:
        missing = sorted({it.profile_id for it in items if it.profile_id is not None} - set(subjects))
        if missing:
            problems.append(f"subjects: no name for subject id(s) {', '.join(missing)}")
    if problems:
        raise InputError(f"cannot write item table {store.uri(key)} ({len(problems)} problem"
                         f"{'s' if len(problems) != 1 else ''}):\n" + "\n".join(f"  {p}" for p in problems))
    key = key.strip("/")
    store.delete(f"{key}/{ITEMSET_FILE}")  # before anything else changes: no stale manifest over new files
    files: dict[str, str] = {}
    for rel in sorted(used):
        data = images[rel]
        store.write_bytes(f"{key}/{rel}", data)
        files[rel] = hashlib.sha256(data).hexdigest()
    blob = _parquet_bytes(items)
    store.write_bytes(f"{key}/{ITEMS_FILE}", blob)
    files[ITEMS_FILE] = hashlib.sha256(blob).hexdigest()
    if subjects is not None:
        blob = (json.dumps(dict(sorted(subjects.items())), indent=1, ensure_ascii=False) + "\n").encode()
        store.write_bytes(f"{key}/{SUBJECTS_FILE}", blob)
        files[SUBJECTS_FILE] = hashlib.sha256(blob).hexdigest()
    counts = {kind: n for kind in KINDS if (n := sum(1 for it in items if it.kind == kind))}
    doc = {"schema": ITEMS_SCHEMA_VERSION, "files": dict(sorted(files.items())), "counts": counts}
    store.write_text(f"{key}/{ITEMSET_FILE}", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return store.uri(key)


class ItemTable:
    """A loaded item table: the rows eagerly (small), images on :meth:`load_image`. Quacks like
    :class:`~mip_core.benchmark.Benchmark` where the service needs it (``root``, ``items``, ``profiles``,
    ``load_image``, ``text_corpus``); it has no profiles and no forget splits, since nobody in it is fictitious."""

    __slots__ = ("_by_image", "counts", "files", "items", "profiles", "root", "subjects")

    def __init__(self, root: Path, items: tuple[Item, ...], files: dict[str, str], counts: dict[str, int],
                 subjects: dict[str, str]) -> None:
        self.root = root
        self.items = items
        self.files = files
        self.counts = counts
        self.subjects = subjects
        self.profiles: tuple[()] = ()
        self._by_image: dict[str, str] = {}
        for it in items:
            if it.image is not None:
                self._by_image.setdefault(it.image, it.item_id)

    def __repr__(self) -> str:
        return f"ItemTable({str(self.root)!r}, items={len(self.items)}, counts={self.counts})"

    def load_image(self, item_or_relpath: Item | str) -> Image.Image:
        """Decode one image as RGB after checking its sha256 against ``itemset.json`` (like
        ``Benchmark.load_image``: a swapped or damaged file fails here, not as a silently wrong answer)."""
        if isinstance(item_or_relpath, Item):
            if item_or_relpath.image is None:
                raise BenchmarkImageError(f"item {item_or_relpath.item_id!r} is text-only and has no image; "
                                          "load images of multimodal items only")
            rel, owner = item_or_relpath.image, item_or_relpath.item_id
        else:
            rel = str(item_or_relpath).replace(os.sep, "/")
            owner = self._by_image.get(rel, "<no item uses this path>")
        expected = self.files.get(rel)
        if expected is None or not _safe_relpath(rel):
            raise BenchmarkImageError(f"image {rel!r} (item {owner}) is not listed in {self.root / ITEMSET_FILE}; "
                                      f"{REWRITE_HINT}")
        path = self.root / rel
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BenchmarkImageError(f"image {path} (item {owner}) cannot be read ({exc.strerror or exc}); "
                                      f"{REWRITE_HINT}") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise BenchmarkImageError(f"image {path} (item {owner}) differs from the sha256 in {ITEMSET_FILE} "
                                      f"(modified or corrupted); {REWRITE_HINT}")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise BenchmarkImageError(f"image {path} (item {owner}) cannot be decoded ({type(exc).__name__}: "
                                      f"{exc}); {REWRITE_HINT}") from None

    def text_corpus(self) -> list[str]:
        """Every question, answer and option string in table order (as ``Benchmark.text_corpus``)."""
        out: list[str] = []
        for it in self.items:
            out += [it.question, it.answer, *it.options]
        return out


def _checked_bytes(root: Path, rel: str, files: dict[str, str]) -> bytes:
    path = root / rel
    if not path.is_file():
        raise ItemTableError(f"{path} is missing (listed in {root / ITEMSET_FILE}); {REWRITE_HINT}")
    data = path.read_bytes()
    if files.get(rel) != hashlib.sha256(data).hexdigest():
        raise ItemTableError(f"{path} differs from the sha256 in {root / ITEMSET_FILE} (modified or corrupted); "
                             f"{REWRITE_HINT}")
    return data


def _read_itemset(root: Path) -> tuple[dict[str, str], dict[str, int]]:
    mpath = root / ITEMSET_FILE
    if not mpath.is_file():
        what = "does not exist" if not root.exists() else (
            f"has no {ITEMSET_FILE}: it is not an item table, or its writing did not finish")
        raise ItemTableError(f"item table {root} {what}; {REWRITE_HINT}")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ItemTableError(f"{mpath} is not valid JSON ({exc}); {REWRITE_HINT}") from None
    found = doc.get("schema") if isinstance(doc, dict) else None
    if found != ITEMS_SCHEMA_VERSION:
        raise ItemTableError(f"{mpath} has schema version {found!r} but this code reads {ITEMS_SCHEMA_VERSION!r}; "
                             f"{REWRITE_HINT} with this version of mip")
    try:
        files = {str(k): str(v) for k, v in doc["files"].items()}
        counts = {str(k): int(v) for k, v in doc["counts"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ItemTableError(f"{mpath} is missing or has a malformed field ({exc!r}); {REWRITE_HINT}") from None
    if ITEMS_FILE not in files:
        raise ItemTableError(f"{mpath} lists no {ITEMS_FILE}; {REWRITE_HINT}")
    return files, counts


def load_item_table(path: str | os.PathLike[str]) -> ItemTable:
    """Open the item table in the LOCAL folder ``path`` (localize an s3:// URI first, or use
    :func:`read_item_table`), checking its schema version, columns and file hashes."""
    root = Path(path)
    files, counts = _read_itemset(root)
    data = _checked_bytes(root, ITEMS_FILE, files)
    where = root / ITEMS_FILE
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ItemTableError(f"{where} is not a readable parquet file ({exc}); {REWRITE_HINT}") from None
    found = table_schema_version(table.schema)
    if found != ITEMS_SCHEMA_VERSION:
        raise ItemTableError(f"{where} has schema version {found!r} but this code reads {ITEMS_SCHEMA_VERSION!r}; "
                             f"{REWRITE_HINT}")
    if not table.schema.equals(TABLE_SCHEMA, check_metadata=False):
        raise ItemTableError(f"{where} columns {table.schema.names} ({[str(t) for t in table.schema.types]}) do "
                             f"not match {ITEMS_SCHEMA_VERSION!r} ({TABLE_SCHEMA.names}); {REWRITE_HINT}")
    try:
        items = tuple(Item.from_row(r) for r in table.to_pylist())
    except BenchmarkError as exc:
        raise ItemTableError(f"{where}: {exc}") from None
    subjects: dict[str, str] = {}
    if SUBJECTS_FILE in files:
        subjects = {str(k): str(v) for k, v in json.loads(_checked_bytes(root, SUBJECTS_FILE, files)).items()}
    got = {kind: n for kind in KINDS if (n := sum(1 for it in items if it.kind == kind))}
    if got != counts:
        raise ItemTableError(f"{where} holds {got} items by kind but {ITEMSET_FILE} says {counts}; {REWRITE_HINT}")
    return ItemTable(root, items, files, counts, subjects)


def is_item_table(path: str | os.PathLike[str]) -> bool:
    """True when the local folder ``path`` holds an ``itemset.json``, or an ``items.parquet`` without a benchmark's
    ``manifest.json`` (an item table whose writing did not finish: reported as that, not as a bad benchmark)."""
    root = Path(path)
    return (root / ITEMSET_FILE).is_file() or ((root / ITEMS_FILE).is_file()
                                               and not (root / "manifest.json").is_file())


def load_items(path: str | os.PathLike[str]) -> ItemTable | Benchmark:
    """Whatever a model's dataset is, opened: an item table if the local folder has ``itemset.json``, else a
    generated benchmark. The service's actors call this on a batch's (localized) dataset URI."""
    return load_item_table(path) if is_item_table(path) else load_benchmark(path)


def read_item_table(store: ServiceStore, key: str) -> ItemTable:
    """The item table at ``key`` of ``store``, copied into the local cache first when the store is remote."""
    from mip_core.modeling.io import localize

    uri = store.uri(key)
    return load_item_table(localize(uri, store.endpoint_url) if store.remote else uri)


__all__ = [
    "IMAGES_DIR", "ITEMSET_FILE", "ITEMS_FILE", "ITEMS_SCHEMA_VERSION", "SUBJECTS_FILE", "TABLE_SCHEMA",
    "ItemTable", "ItemTableError", "image_relpath", "is_item_table", "load_item_table", "load_items",
    "read_item_table", "write_item_table",
]
