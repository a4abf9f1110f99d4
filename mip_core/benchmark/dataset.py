"""Reading a generated benchmark: validation, splits and lazy image access."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .generate import IMAGES_DIR, ITEMS_FILE, MANIFEST_FILE, PROFILES_FILE, content_digest
from .schema import (
    BENCH_SCHEMA_VERSION,
    FORGET_PCTS,
    ITEMS_SCHEMA,
    MAKE_HINT,
    PROFILES_SCHEMA,
    SPLITS,
    BenchmarkError,
    BenchmarkImageError,
    BenchmarkSchemaError,
    Item,
    Manifest,
    Profile,
    check_forget_pct,
    check_modality,
    table_schema_version,
)


NO_BENCHMARK_ENV = "MIP_NO_BENCHMARK"


class Benchmark:
    """A loaded benchmark. Tables are read eagerly (they are small); images only on :meth:`load_image`."""

    __slots__ = ("_by_image", "_profiles_by_id", "items", "manifest", "profiles", "root")

    def __init__(
        self, root: Path, manifest: Manifest, profiles: tuple[Profile, ...], items: tuple[Item, ...]
    ):
        self.root = root
        self.manifest = manifest
        self.profiles = profiles
        self.items = items
        self._by_image: dict[str, str] = {}
        for it in items:
            if it.image is not None:
                self._by_image.setdefault(it.image, it.item_id)
        self._profiles_by_id = {p.profile_id: p for p in profiles}

    def __repr__(self) -> str:
        m = self.manifest
        n_items = len(self.items)
        return f"Benchmark({str(self.root)!r}, n_profiles={m.n_profiles}, items={n_items}, seed={m.seed})"

    def profile(self, profile_id: str) -> Profile:
        try:
            return self._profiles_by_id[profile_id]
        except KeyError:
            raise BenchmarkError(f"profile_id={profile_id!r} is not in this benchmark ({len(self.profiles)} "
                                 f"profiles, p0000..p{len(self.profiles) - 1:04d})") from None  # fmt: skip

    def forget_profile_ids(self, pct: int) -> frozenset[str]:
        """Profiles to forget at ``pct`` percent; nested: forget05 is a subset of forget10 of forget15."""
        size = self.manifest.forget_sizes[check_forget_pct(pct)]
        return frozenset(p.profile_id for p in self.profiles if p.forget_rank < size)

    def retain_profile_ids(self, pct: int) -> frozenset[str]:
        forget = self.forget_profile_ids(pct)
        return frozenset(p.profile_id for p in self.profiles if p.profile_id not in forget)

    def with_forget_seed(self, seed: int) -> Benchmark:
        """The same benchmark with another forget subset of the same sizes (still nested).

        Seed 0 is the benchmark's own split; seed ``s > 0`` re-draws every profile's ``forget_rank`` from a
        permutation seeded by ``(manifest seed, s)``. Comparisons repeat over seeds because a handful of forget
        profiles is too few to rank close methods on one split.
        """
        if seed == 0:
            return self
        if seed < 0:
            raise BenchmarkError(f"forget seed must be >= 0, got {seed}")
        perm = np.random.default_rng([self.manifest.seed, 104729, seed]).permutation(len(self.profiles))
        profiles = tuple(dataclasses.replace(p, forget_rank=int(perm[i])) for i, p in enumerate(self.profiles))
        return Benchmark(self.root, self.manifest, profiles, self.items)

    def split_items(self, split: str, *, forget_pct: int = 5, modality: str | None = None) -> list[Item]:
        """Items of one split, in table order.

        ``forget``/``retain``: ``qa`` items of the forget / other profiles; ``test``: ``test`` items
        (paraphrased question, transformed image) of the forget profiles; ``utility``: general items;
        ``train``: everything the vanilla model is fine-tuned on (all ``qa`` and ``utility``).
        """
        if split not in SPLITS:
            raise BenchmarkError(f"split={split!r} is not valid; use one of {list(SPLITS)}")
        check_modality(modality)
        forget = self.forget_profile_ids(forget_pct)
        kinds = {"forget": ("qa",), "retain": ("qa",), "test": ("test",), "utility": ("utility",)}
        wanted = kinds.get(split, ("qa", "utility"))
        out = []
        for it in self.items:
            if it.kind not in wanted or (modality is not None and it.modality != modality):
                continue
            if split in ("forget", "test") and it.profile_id not in forget:
                continue
            if split == "retain" and it.profile_id in forget:
                continue
            out.append(it)
        return out

    def _resolve(self, item_or_relpath: Item | Profile | str) -> tuple[str, str]:
        if isinstance(item_or_relpath, Item):
            if item_or_relpath.image is None:
                raise BenchmarkImageError(
                    f"item {item_or_relpath.item_id!r} is text-only and has no image; load images of "
                    "multimodal items only"
                )
            return item_or_relpath.image, item_or_relpath.item_id
        if isinstance(item_or_relpath, Profile):
            return item_or_relpath.image, item_or_relpath.profile_id
        rel = str(item_or_relpath).replace(os.sep, "/")
        return rel, self._by_image.get(rel, "<no item uses this path>")

    def load_image(self, item_or_relpath: Item | Profile | str) -> Image.Image:
        """Decode one image as RGB, checking it against the manifest's sha256 first."""
        rel, owner = self._resolve(item_or_relpath)
        path = (self.root / rel).resolve()
        if self.root.resolve() not in path.parents:
            raise BenchmarkImageError(
                f"image path {rel!r} (item {owner}) is outside the benchmark dir {self.root}"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BenchmarkImageError(
                f"image {rel!r} for item {owner} cannot be read ({exc.strerror or exc}); {MAKE_HINT}"
            ) from None
        expected = self.manifest.files.get(rel)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise BenchmarkImageError(
                f"image {rel!r} for item {owner} is corrupted (sha256 differs from "
                f"manifest.json); {MAKE_HINT}"
            )
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except (
            OSError,
            SyntaxError,
            ValueError,
            EOFError,
            Image.DecompressionBombError,
        ) as exc:  # PIL, bad data
            raise BenchmarkImageError(
                f"image {rel!r} for item {owner} cannot be decoded ({type(exc).__name__}: {exc}); {MAKE_HINT}"
            ) from None

    def text_corpus(self) -> list[str]:
        """Every question, answer and option string in table order, repeats kept so frequencies are real."""
        out: list[str] = []
        for it in self.items:
            out.append(it.question)
            out.append(it.answer)
            out.extend(it.options)
        return out

    def verify(self) -> None:
        """Check every file against the manifest and recompute ``content_sha256``; raises on any mismatch.

        Slower than loading (decodes every image); meant for ``mip benchmark verify`` and CI, not hot paths.
        """
        for rel, expected in sorted(self.manifest.files.items()):
            if rel.startswith(f"{IMAGES_DIR}/"):
                continue  # checked by load_image below
            if hashlib.sha256((self.root / rel).read_bytes()).hexdigest() != expected:
                raise BenchmarkError(f"{self.root / rel} differs from manifest.json; {MAKE_HINT}")
        images = [
            (rel, np.asarray(self.load_image(rel)))
            for rel in self.manifest.files
            if rel.startswith(f"{IMAGES_DIR}/")
        ]
        digest = content_digest(
            (p.to_row() for p in self.profiles), (it.to_row() for it in self.items), images
        )
        if digest != self.manifest.content_sha256:
            raise BenchmarkError(f"content of {self.root} differs from manifest content_sha256; {MAKE_HINT}")


def _read_table(root: Path, name: str, expected: pa.Schema, manifest: Manifest) -> pa.Table:
    path = root / name
    if not path.is_file():
        raise BenchmarkSchemaError(f"{path} is missing; {MAKE_HINT}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:  # non-parquet bytes
        raise BenchmarkSchemaError(f"{path} is not a readable parquet file ({exc}); {MAKE_HINT}") from None
    found = table_schema_version(schema)
    if found != BENCH_SCHEMA_VERSION:
        raise BenchmarkSchemaError(
            f"{path} has schema version {found!r} but this code reads {BENCH_SCHEMA_VERSION!r}; {MAKE_HINT}"
        )
    if not schema.equals(expected, check_metadata=False):
        raise BenchmarkSchemaError(
            f"{path} columns {schema.names} ({[str(t) for t in schema.types]}) do not match schema "
            f"{BENCH_SCHEMA_VERSION!r} ({expected.names}); {MAKE_HINT}"
        )
    data = path.read_bytes()
    if manifest.files.get(name) != hashlib.sha256(data).hexdigest():
        raise BenchmarkError(
            f"{path} differs from the sha256 in manifest.json (modified or corrupted); {MAKE_HINT}"
        )
    return pq.read_table(io.BytesIO(data))


def load_benchmark(path: str | os.PathLike[str]) -> Benchmark:
    """Open a benchmark dir made by :func:`make_benchmark`, validating manifest and table schema versions.

    ``MIP_NO_BENCHMARK=1`` forbids it: a service whose models are registered with their own keep-sets sets it to
    prove that nothing depends on a training benchmark (the end-to-end test does)."""
    if os.environ.get(NO_BENCHMARK_ENV, "") not in ("", "0"):
        raise BenchmarkError(f"{NO_BENCHMARK_ENV} is set, so no benchmark may be opened, but something asked for "
                             f"{path}; register the model with keep-sets (`mip models register --retain --utility`)"
                             f" or unset {NO_BENCHMARK_ENV}")
    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        what = "does not exist" if not root.exists() else f"has no {MANIFEST_FILE}"
        raise BenchmarkSchemaError(
            f"benchmark dir {root} {what}; create it with `mip benchmark make --out {root}`"
        )
    manifest = Manifest.from_json(mpath.read_text(encoding="utf-8"), source=str(mpath))
    if set(manifest.forget_sizes) != set(FORGET_PCTS):
        raise BenchmarkSchemaError(f"{mpath} forget_sizes has pcts {sorted(manifest.forget_sizes)}, expected "
                                   f"{list(FORGET_PCTS)}; {MAKE_HINT}")  # fmt: skip
    prof_table = _read_table(root, PROFILES_FILE, PROFILES_SCHEMA, manifest)
    item_table = _read_table(root, ITEMS_FILE, ITEMS_SCHEMA, manifest)
    profiles = tuple(Profile.from_row(r) for r in prof_table.to_pylist())
    items = tuple(Item.from_row(r) for r in item_table.to_pylist())
    if len(profiles) != manifest.n_profiles or len(items) != manifest.counts.get("items"):
        raise BenchmarkError(f"{root}: table sizes do not match manifest.json; {MAKE_HINT}")
    return Benchmark(root, manifest, profiles, items)
