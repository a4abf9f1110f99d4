"""Synthetic forget benchmark: fictitious people (in the spirit of MLLMU-Bench) asked about in two modalities.

Generate with :func:`make_benchmark` (``mip benchmark make``), read with :func:`load_benchmark`. The on-disk
schema is documented and versioned in ``docs/benchmark.md``.
"""

from .dataset import Benchmark, load_benchmark
from .generate import corpus_for_tokenizer, default_n_utility, make_benchmark
from .schema import (
    BENCH_SCHEMA_VERSION,
    FORGET_PCTS,
    GENERATOR_VERSION,
    KINDS,
    PROFILE_FACTS,
    QA_FACTS,
    SPLITS,
    UTILITY_FACTS,
    BenchmarkError,
    BenchmarkImageError,
    BenchmarkSchemaError,
    FactMap,
    Item,
    Manifest,
    Profile,
    forget_size,
)

__all__ = [
    "BENCH_SCHEMA_VERSION",
    "FORGET_PCTS",
    "GENERATOR_VERSION",
    "KINDS",
    "PROFILE_FACTS",
    "QA_FACTS",
    "SPLITS",
    "UTILITY_FACTS",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkImageError",
    "BenchmarkSchemaError",
    "FactMap",
    "Item",
    "Manifest",
    "Profile",
    "corpus_for_tokenizer",
    "default_n_utility",
    "forget_size",
    "load_benchmark",
    "make_benchmark",
]
