"""Versioned on-disk schema of the synthetic forget benchmark: constants, errors and the record types.

Everything that reads or writes a benchmark goes through the types here, so a column change is made in exactly
one place (and must bump :data:`BENCH_SCHEMA_VERSION`, see ``docs/benchmark.md``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mip_core.errors import MipError
from mip_core.types import MODALITIES

BENCH_SCHEMA_VERSION = "mip-bench/1"
"""Bumped on any change of a column, a manifest field or the meaning of either."""
GENERATOR_VERSION = "1.0.0"
"""Bumped on any change of generated content (pools, templates, rendering, RNG use) at a fixed schema."""
FORGET_PCTS: tuple[int, ...] = (5, 10, 15)

KINDS: tuple[str, ...] = ("qa", "test", "utility")
PROFILE_FACTS: tuple[str, ...] = ("birthplace", "occupation", "birth_year", "employer", "hobby")
"""Facts stored per profile; ``name`` is asked about too (multimodal only) but lives in ``Profile.name``."""
QA_FACTS: tuple[str, ...] = ("name", *PROFILE_FACTS)
UTILITY_FACTS: tuple[str, ...] = ("shape", "colour", "count", "text_fact", "arithmetic")
SPLITS: tuple[str, ...] = ("forget", "retain", "test", "utility", "train")

MAKE_HINT = "regenerate it with `mip benchmark make --out DIR`"
_SCHEMA_META_KEY = b"mip.schema"


class BenchmarkError(MipError, ValueError):
    """Any problem with a benchmark; the message names the problem and the fix."""


class BenchmarkSchemaError(BenchmarkError):
    """The manifest or a table is missing or has another schema version than this code reads."""


class BenchmarkImageError(BenchmarkError):
    """An image file is missing, modified or cannot be decoded."""


def forget_size(n_profiles: int, pct: int) -> int:
    """Profiles in forget split ``pct``: ``max(1, round(n*pct/100))`` with Python's half-to-even ``round``.

    Exposed so that no caller re-derives it with a different rounding rule.
    """
    check_forget_pct(pct)
    return max(1, round(n_profiles * pct / 100))


def check_forget_pct(pct: int) -> int:
    if isinstance(pct, bool) or pct not in FORGET_PCTS:
        raise BenchmarkError(f"forget_pct={pct!r} is not supported; use one of {list(FORGET_PCTS)}")
    return pct


def check_modality(modality: str | None) -> str | None:
    if modality is not None and modality not in MODALITIES:
        raise BenchmarkError(
            f"modality={modality!r} is not valid; use one of {list(MODALITIES)} or None for both"
        )
    return modality


class FactMap(Mapping[str, str]):
    """Read-only, hashable ``fact -> value`` mapping, so a frozen :class:`Profile` stays hashable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Any = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: tuple[tuple[str, str], ...] = tuple((str(k), str(v)) for k, v in pairs)

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FactMap):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"FactMap({dict(self._items)!r})"


@dataclass(frozen=True, slots=True)
class Item:
    """One question. The same item serves open generation (question -> answer) and multiple choice (options).

    Invariants are checked on construction so a hand-edited or corrupted table fails loudly at load time.
    """

    item_id: str
    profile_id: str | None
    kind: str
    fact: str
    modality: str
    question: str
    answer: str
    options: tuple[str, ...]  # 4 distinct strings, or () for a free-form item
    answer_index: int  # -1 for a free-form item
    image: str | None

    def __post_init__(self) -> None:
        where = f"item {self.item_id!r}"
        if self.kind not in KINDS:
            raise BenchmarkError(f"{where}: kind={self.kind!r} is not one of {list(KINDS)}; {MAKE_HINT}")
        if self.modality not in MODALITIES:
            raise BenchmarkError(
                f"{where}: modality={self.modality!r} is not one of {list(MODALITIES)}; {MAKE_HINT}"
            )
        if (self.kind == "utility") != (self.profile_id is None):
            raise BenchmarkError(f"{where}: utility items (and only they) have profile_id None; {MAKE_HINT}")
        if (self.modality == "multimodal") != (self.image is not None):
            raise BenchmarkError(f"{where}: multimodal items (and only they) have an image; {MAKE_HINT}")
        opts = tuple(self.options)
        if not opts and self.answer_index == -1:  # free-form: scored by its greedy answer, not by options
            object.__setattr__(self, "options", ())
            return
        if len(opts) != 4 or len(set(opts)) != 4:
            raise BenchmarkError(f"{where}: needs 4 distinct options (or none and answer_index -1 for a free-form "
                                 f"item), got {opts!r} with answer_index {self.answer_index}; {MAKE_HINT}")
        if not 0 <= self.answer_index < 4:
            raise BenchmarkError(
                f"{where}: answer_index={self.answer_index!r} must index one of its 4 options (0-3); -1 is only "
                f"for a free-form item, which has no options; {MAKE_HINT}"
            )
        if opts[self.answer_index] != self.answer:
            raise BenchmarkError(
                f"{where}: options[{self.answer_index}] is not the answer {self.answer!r}; {MAKE_HINT}"
            )
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", opts)

    @property
    def free_form(self) -> bool:
        """No options: correct when the model's greedy answer gives ``answer`` (a probe the service built)."""
        return not self.options

    def to_row(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "profile_id": self.profile_id,
            "kind": self.kind,
            "fact": self.fact,
            "modality": self.modality,
            "question": self.question,
            "answer": self.answer,
            "options": list(self.options),
            "answer_index": self.answer_index,
            "image": self.image,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Item:
        return cls(
            item_id=row["item_id"],
            profile_id=row["profile_id"],
            kind=row["kind"],
            fact=row["fact"],
            modality=row["modality"],
            question=row["question"],
            answer=row["answer"],
            options=tuple(row["options"]),  # type: ignore[arg-type]
            answer_index=int(row["answer_index"]),
            image=row["image"],
        )


@dataclass(frozen=True, slots=True)
class Profile:
    """A fictitious person: name, portrait and the facts the model is taught about them.

    ``forget_rank`` is the profile's position in a seeded permutation; the profile is in forget split ``p``
    iff ``forget_rank < forget_size(n, p)``, which is what makes the forget splits nested.
    """

    profile_id: str
    name: str
    image: str
    facts: FactMap
    forget_rank: int

    def __post_init__(self) -> None:
        if not isinstance(self.facts, FactMap):
            object.__setattr__(self, "facts", FactMap(self.facts))

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "profile_id": self.profile_id,
            "name": self.name,
            "image": self.image,
            "forget_rank": self.forget_rank,
        }
        row.update({f: self.facts[f] for f in PROFILE_FACTS})
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Profile:
        return cls(
            profile_id=row["profile_id"],
            name=row["name"],
            image=row["image"],
            facts=FactMap((f, row[f]) for f in PROFILE_FACTS),
            forget_rank=int(row["forget_rank"]),
        )


_META = {_SCHEMA_META_KEY: BENCH_SCHEMA_VERSION.encode()}

PROFILES_SCHEMA = pa.schema(
    [
        pa.field("profile_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("forget_rank", pa.int32(), nullable=False),
        *[pa.field(f, pa.string(), nullable=False) for f in PROFILE_FACTS],
    ],
    metadata=_META,
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("profile_id", pa.string(), nullable=True),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("fact", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("options", pa.list_(pa.string()), nullable=False),
        pa.field("answer_index", pa.int8(), nullable=False),
        pa.field("image", pa.string(), nullable=True),
    ],
    metadata=_META,
)


def table_schema_version(schema: pa.Schema) -> str | None:
    meta = schema.metadata or {}
    raw = meta.get(_SCHEMA_META_KEY)
    return raw.decode("utf-8", "replace") if raw is not None else None


@dataclass(frozen=True)
class Manifest:
    """Top-level description of a generated benchmark, written last so a half-written dir has none.

    ``files`` maps every other file (relative path) to its sha256; ``content_sha256`` hashes the rows and
    decoded pixels, so it stays equal across library versions that encode PNG/parquet bytes differently.
    """

    schema: str
    generator_version: str
    seed: int
    n_profiles: int
    n_utility: int
    image_size: int
    counts: dict[str, int]
    forget_sizes: dict[int, int]
    files: dict[str, str] = field(default_factory=dict)
    content_sha256: str = ""

    def to_json(self) -> str:
        doc = {
            "schema": self.schema,
            "generator_version": self.generator_version,
            "seed": self.seed,
            "n_profiles": self.n_profiles,
            "n_utility": self.n_utility,
            "image_size": self.image_size,
            "counts": dict(self.counts),
            "forget_sizes": {str(k): v for k, v in self.forget_sizes.items()},
            "files": dict(self.files),
            "content_sha256": self.content_sha256,
        }
        return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest.json") -> Manifest:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchmarkSchemaError(f"{source} is not valid JSON ({exc}); {MAKE_HINT}") from None
        if not isinstance(doc, dict):
            raise BenchmarkSchemaError(f"{source} is not a JSON object; {MAKE_HINT}")
        found = doc.get("schema")
        if found != BENCH_SCHEMA_VERSION:
            raise BenchmarkSchemaError(
                f"{source} has schema version {found!r} but this code reads {BENCH_SCHEMA_VERSION!r}; "
                f"{MAKE_HINT}"
            )
        try:
            return cls(
                schema=found,
                generator_version=str(doc["generator_version"]),
                seed=int(doc["seed"]),
                n_profiles=int(doc["n_profiles"]),
                n_utility=int(doc["n_utility"]),
                image_size=int(doc["image_size"]),
                counts={str(k): int(v) for k, v in doc["counts"].items()},
                forget_sizes={int(k): int(v) for k, v in doc["forget_sizes"].items()},
                files={str(k): str(v) for k, v in doc["files"].items()},
                content_sha256=str(doc["content_sha256"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BenchmarkSchemaError(
                f"{source} (schema {found!r}) is missing or has a malformed field ({exc!r}); {MAKE_HINT}"
            ) from None
