"""Deterministic generator of the synthetic forget benchmark (``mip benchmark make``).

Every random choice comes from ``numpy.random.default_rng([seed, stream, index])`` with a fixed stream per
purpose, so one part of the content does not shift when another changes size: profile ``i``'s name, facts,
portrait and questions are the same for every ``n_profiles > i`` (only forget ranks and name distractors
depend on ``n``). No timestamps, sorted JSON, metadata-free PNGs: the same seed gives the same bytes (with the
same zlib/pyarrow builds; ``content_sha256`` in the manifest is independent of those).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mip_core.types import MODALITIES

from . import content as C
from .images import TRANSFORMS, assign_appearances, render_portrait, render_shapes, transform_image, write_png
from .schema import (
    BENCH_SCHEMA_VERSION,
    FORGET_PCTS,
    GENERATOR_VERSION,
    ITEMS_SCHEMA,
    KINDS,
    PROFILE_FACTS,
    PROFILES_SCHEMA,
    QA_FACTS,
    BenchmarkError,
    FactMap,
    Item,
    Manifest,
    Profile,
    forget_size,
)

MANIFEST_FILE = "manifest.json"
PROFILES_FILE = "profiles.parquet"
ITEMS_FILE = "items.parquet"
IMAGES_DIR = "images"

# RNG streams; never renumber (that changes content and needs a GENERATOR_VERSION bump).
_S_NAMES, _S_APPEARANCE, _S_FACTS, _S_FORGET, _S_QA, _S_NAME_OPTIONS, _S_TEST, _S_UTIL_MM, _S_UTIL_TEXT = (
    range(1, 10)
)
_UTIL_MM_FACTS = ("shape", "colour", "count")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def default_n_utility(n_profiles: int) -> int:
    """Utility items per modality when not given: enough to measure general ability, scaled with the set."""
    return max(40, n_profiles // 2)


def max_text_utility() -> int:
    return len(C.TEXT_FACTS) + len(C.arithmetic_facts())


def _mc(
    answer: str, distractors: Sequence[str], rng: np.random.Generator
) -> tuple[tuple[str, str, str, str], int]:
    opts = [answer, *distractors]
    perm = rng.permutation(4)
    shuffled = tuple(opts[int(k)] for k in perm)
    return shuffled, shuffled.index(answer)  # type: ignore[return-value]


def _distractors(answer: str, pool: Sequence[str], rng: np.random.Generator) -> list[str]:
    others = [v for v in dict.fromkeys(pool) if v != answer]
    return [others[int(k)] for k in rng.choice(len(others), size=3, replace=False)]


def _reshuffle(
    options: Sequence[str], answer: str, rng: np.random.Generator
) -> tuple[tuple[str, str, str, str], int]:
    shuffled = tuple(options[int(k)] for k in rng.permutation(4))
    return shuffled, shuffled.index(answer)  # type: ignore[return-value]


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise BenchmarkError(f"{name}={value!r} is invalid; pass an integer in [{lo}, {hi}]")
    return int(value)


def content_digest(
    profile_rows: Iterable[dict[str, Any]],
    item_rows: Iterable[dict[str, Any]],
    images: Iterable[tuple[str, np.ndarray]],
) -> str:
    """sha256 of the rows and decoded pixels: equal across zlib/pyarrow versions, unlike the file hashes."""
    h = hashlib.sha256()
    for rows in (profile_rows, item_rows):
        h.update(json.dumps(list(rows), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
    for rel, arr in sorted(images, key=lambda p: p[0]):
        h.update(f"{rel}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _build(
    n: int, seed: int, image_size: int, n_utility: int
) -> tuple[list[Profile], list[Item], dict[str, np.ndarray]]:
    """All content in memory: profiles, items (by kind, profile, fact, modality) and images by path."""
    images: dict[str, np.ndarray] = {}
    profiles, qa, test = _build_profiles(n, seed, image_size, images)
    utility = _build_mm_utility(seed, n_utility, image_size, images) + _build_text_utility(seed, n_utility)
    return profiles, qa + test + utility, images


def _build_profiles(
    n: int, seed: int, image_size: int, images: dict[str, np.ndarray]
) -> tuple[list[Profile], list[Item], list[Item]]:
    """The people, their portraits (added to ``images``) and their qa and test items."""
    n_last = len(C.LAST_NAMES)
    name_keys = _rng(seed, _S_NAMES).permutation(C.MAX_PROFILES)[:n]
    names = [f"{C.FIRST_NAMES[int(k) // n_last]} {C.LAST_NAMES[int(k) % n_last]}" for k in name_keys]
    ranks = np.empty(n, dtype=np.int64)
    ranks[_rng(seed, _S_FORGET).permutation(n)] = np.arange(n)
    appearances = assign_appearances(n, _rng(seed, _S_APPEARANCE))

    profiles: list[Profile] = []
    qa: list[Item] = []
    test: list[Item] = []
    for i in range(n):
        pid = f"p{i:04d}"
        portrait = render_portrait(appearances[i], image_size)
        img_path = f"{IMAGES_DIR}/{pid}.png"
        images[img_path] = portrait
        frng = _rng(seed, _S_FACTS, i)
        facts = {f: C.FACT_POOLS[f][int(frng.integers(len(C.FACT_POOLS[f])))] for f in PROFILE_FACTS}
        profiles.append(Profile(pid, names[i], img_path, FactMap(facts), int(ranks[i])))
        profile_qa, profile_test = _profile_items(seed, i, names, facts, portrait, images)
        qa += profile_qa
        test += profile_test
    return profiles, qa, test


def _profile_items(
    seed: int, i: int, names: Sequence[str], facts: dict[str, str], portrait: np.ndarray, images: dict[str, np.ndarray]
) -> tuple[list[Item], list[Item]]:
    """Profile ``i``'s qa items and their test paraphrases; the transformed portraits go to ``images``."""
    pid = f"p{i:04d}"
    img_path = f"{IMAGES_DIR}/{pid}.png"
    qrng, trng = _rng(seed, _S_QA, i), _rng(seed, _S_TEST, i)
    others = [names[j] for j in range(len(names)) if j != i]
    name_distractors = _distractors(names[i], others, _rng(seed, _S_NAME_OPTIONS, i))
    offset = int(trng.integers(len(TRANSFORMS)))
    qa: list[Item] = []
    test: list[Item] = []
    for fi, fact in enumerate(QA_FACTS):
        answer = names[i] if fact == "name" else facts[fact]
        for modality in MODALITIES:
            if (fact, modality) not in C.QA_TEMPLATES:
                continue
            mm = modality == "multimodal"
            tag = "mm" if mm else "text"
            templates = C.QA_TEMPLATES[(fact, modality)]
            question = templates[int(qrng.integers(len(templates)))].format(name=names[i])
            dist = name_distractors if fact == "name" else _distractors(answer, C.FACT_POOLS[fact], qrng)
            options, idx = _mc(answer, dist, qrng)
            qa.append(
                Item(f"{pid}-{fact}-{tag}-qa", pid, "qa", fact, modality, question, answer, options, idx,
                     img_path if mm else None)
            )  # fmt: skip
            paraphrases = C.TEST_TEMPLATES[(fact, modality)]
            t_question = paraphrases[int(trng.integers(len(paraphrases)))].format(name=names[i])
            t_options, t_idx = _reshuffle(options, answer, trng)
            t_image = None
            if mm:
                kind = TRANSFORMS[(offset + fi) % len(TRANSFORMS)]
                t_image = f"{IMAGES_DIR}/{pid}-{fact}-test-{kind}.png"
                images[t_image] = transform_image(portrait, kind, trng)
            t_id = f"{pid}-{fact}-{tag}-test"
            test.append(Item(t_id, pid, "test", fact, modality, t_question, answer, t_options, t_idx, t_image))
    return qa, test


def _build_mm_utility(seed: int, n_utility: int, image_size: int, images: dict[str, np.ndarray]) -> list[Item]:
    """Multimodal utility items: shape, colour or count questions about rendered shapes (added to ``images``)."""
    utility: list[Item] = []
    colours = tuple(C.SHAPE_COLOURS)
    for j in range(n_utility):
        urng = _rng(seed, _S_UTIL_MM, j)
        fact = _UTIL_MM_FACTS[j % len(_UTIL_MM_FACTS)]
        shape = C.SHAPES[int(urng.integers(len(C.SHAPES)))]
        colour = colours[int(urng.integers(len(colours)))]
        count = int(urng.integers(1, 5))
        rel = f"{IMAGES_DIR}/util-{j:04d}.png"
        images[rel] = render_shapes(shape, colour, count, image_size, urng)
        question, answer, pool = _mm_utility_question(fact, shape, colour, count)
        options, idx = _mc(answer, _distractors(answer, pool, urng), urng)
        utility.append(
            Item(f"util-{fact}-{j:04d}", None, "utility", fact, "multimodal", question, answer, options, idx, rel)
        )
    return utility


def _mm_utility_question(
    fact: str, shape: str, colour: str, count: int
) -> tuple[str, str, Sequence[str]]:
    """Question, answer and distractor pool of a multimodal utility item asking for ``fact``."""
    if fact == "shape":
        return C.UTILITY_MM_TEMPLATES["shape"][0], shape, C.SHAPES
    if fact == "colour":
        return C.UTILITY_MM_TEMPLATES["colour"][0 if count == 1 else 1], colour, tuple(C.SHAPE_COLOURS)
    return C.UTILITY_MM_TEMPLATES["count"][0], C.COUNT_WORDS[count - 1], C.COUNT_WORDS


def _build_text_utility(seed: int, n_utility: int) -> list[Item]:
    """Text utility items: general facts and arithmetic, interleaved, numbered after the multimodal ones."""
    trng = _rng(seed, _S_UTIL_TEXT)
    general = [("text_fact", C.TEXT_FACTS[int(k)]) for k in trng.permutation(len(C.TEXT_FACTS))]
    arith_all = C.arithmetic_facts()
    arith = [("arithmetic", arith_all[int(k)]) for k in trng.permutation(len(arith_all))]
    mixed = (
        [x for pair in zip(general, arith, strict=False) for x in pair]
        + general[len(arith) :]
        + arith[len(general) :]
    )
    utility: list[Item] = []
    for k, (fact, (question, answer, category)) in enumerate(mixed[:n_utility]):
        j = n_utility + k
        options, idx = _mc(answer, _distractors(answer, C.TEXT_CATEGORIES[category], trng), trng)
        utility.append(
            Item(f"util-{fact}-{j:04d}", None, "utility", fact, "text", question, answer, options, idx, None)
        )
    return utility


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_benchmark_dir(path: Path) -> bool:
    try:
        doc = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("schema", "")).startswith("mip-bench/")


def make_benchmark(
    out_dir: str | os.PathLike[str],
    n_profiles: int,
    seed: int,
    *,
    image_size: int = 32,
    n_utility: int | None = None,
) -> Manifest:
    """Generate a benchmark into ``out_dir`` and return its manifest.

    ``out_dir`` must be new, empty, or an existing benchmark (which is replaced as a whole, including any
    extra files in it). Content is built in a sibling temp dir and swapped in, so a crash never leaves a
    half-written benchmark behind a valid manifest.
    """
    n = _check_int("n_profiles", n_profiles, 4, C.MAX_PROFILES)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    image_size = _check_int("image_size", image_size, 16, 256)
    n_util = (
        default_n_utility(n)
        if n_utility is None
        else _check_int("n_utility", n_utility, 0, max_text_utility())
    )
    out = Path(out_dir)
    _check_out_dir(out)

    profiles, items, images = _build(n, seed, image_size, n_util)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        files = _write_images(tmp, images)
        profile_rows = [p.to_row() for p in profiles]
        item_rows = [it.to_row() for it in items]
        files.update(_write_tables(tmp, profile_rows, item_rows))
        manifest = Manifest(
            schema=BENCH_SCHEMA_VERSION,
            generator_version=GENERATOR_VERSION,
            seed=seed,
            n_profiles=n,
            n_utility=n_util,
            image_size=image_size,
            counts=_counts(items, n, len(images)),
            forget_sizes={p: forget_size(n, p) for p in FORGET_PCTS},
            files=dict(sorted(files.items())),
            content_sha256=content_digest(profile_rows, item_rows, images.items()),
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _check_out_dir(out: Path) -> None:
    """Refuse a file, or a non-empty folder that is not a benchmark: replacing it would delete someone's data."""
    if out.exists():
        if not out.is_dir():
            raise BenchmarkError(
                f"{out} exists and is not a directory; pass a new or empty directory as out_dir"
            )
        if any(out.iterdir()) and not _is_benchmark_dir(out):
            raise BenchmarkError(
                f"refusing to write into {out}: it is not empty and holds no benchmark {MANIFEST_FILE}; "
                "pass a new or empty directory, or delete its contents first"
            )


def _write_images(tmp: Path, images: dict[str, np.ndarray]) -> dict[str, str]:
    """Write the PNGs in path order; returns their file hashes by relative path."""
    (tmp / IMAGES_DIR).mkdir(parents=True)
    return {rel: _sha256(write_png(images[rel], tmp / rel)) for rel in sorted(images)}


def _write_tables(tmp: Path, profile_rows: list[dict[str, Any]], item_rows: list[dict[str, Any]]) -> dict[str, str]:
    """Write the profile and item Parquet files; returns their file hashes by name."""
    files: dict[str, str] = {}
    for name, rows, schema in (
        (PROFILES_FILE, profile_rows, PROFILES_SCHEMA),
        (ITEMS_FILE, item_rows, ITEMS_SCHEMA),
    ):
        pq.write_table(_table(rows, schema), tmp / name, compression="snappy")
        files[name] = _sha256((tmp / name).read_bytes())
    return files


def _counts(items: Sequence[Item], n_profiles: int, n_images: int) -> dict[str, int]:
    """Item counts per kind and modality, then the totals, as the manifest lists them."""
    counts = {f"{kind}/{m}": sum(1 for it in items if it.kind == kind and it.modality == m)
              for kind in KINDS for m in MODALITIES}  # fmt: skip
    counts.update(items=len(items), profiles=n_profiles, images=n_images)
    return counts


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` with renames, so no reader sees a half-written benchmark."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def corpus_for_tokenizer() -> list[str]:
    """Every template and pool word, without a generated benchmark, so the tokenizer can be trained first.

    Templates naming a person are filled with 40 names that together use every first and last name.
    """
    names = [f"{f} {C.LAST_NAMES[(k * 7) % len(C.LAST_NAMES)]}" for k, f in enumerate(C.FIRST_NAMES)]
    out: list[str] = []
    for table in (C.QA_TEMPLATES, C.TEST_TEMPLATES):
        for templates in table.values():
            for t in templates:
                out += [t.format(name=nm) for nm in names] if "{name}" in t else [t]
    out += list(C.FIRST_NAMES) + list(C.LAST_NAMES) + names
    for pool in C.FACT_POOLS.values():
        out += list(pool)
    for templates in C.UTILITY_MM_TEMPLATES.values():
        out += list(templates)
    out += list(C.SHAPES) + list(C.SHAPE_COLOURS) + list(C.COUNT_WORDS)
    for words in C.TEXT_CATEGORIES.values():
        out += list(words)
    for question, answer, _ in (*C.TEXT_FACTS, *C.arithmetic_facts()):
        out += [question, answer]
    return out
