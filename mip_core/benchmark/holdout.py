"""Never-seen people for membership inference: the same generator, profiles past the benchmark's last one.

Profile ``i`` of a benchmark is identical for every ``n_profiles > i`` (see ``docs/benchmark.md``), so a
benchmark of ``n + h`` profiles with the same seed holds the original ``n`` people plus ``h`` new ones that
the vanilla model never saw, asked the same kinds of questions. Their items are the "non-members" of the
membership-inference AUC; they are built once and cached.
"""

from __future__ import annotations

import os
from pathlib import Path

from .dataset import Benchmark, load_benchmark
from .generate import make_benchmark
from .schema import BenchmarkError, Item


def holdout_items(bench: Benchmark, n_holdout: int, cache_root: str | os.PathLike[str]
                  ) -> tuple[Benchmark, list[Item]]:
    """``(holdout benchmark, its qa items about people past bench's last profile)``; built under ``cache_root``.

    Raises:
        BenchmarkError: ``n_holdout < 1``, or the extended benchmark disagrees with ``bench`` on a shared
            profile (a different generator version): regenerate ``bench`` with this code.
    """
    if n_holdout < 1:
        raise BenchmarkError(f"n_holdout must be >= 1, got {n_holdout}")
    m = bench.manifest
    n = m.n_profiles
    root = Path(cache_root) / f"holdout-{m.content_sha256[:16]}-{n_holdout}"
    if not (root / "manifest.json").exists():
        make_benchmark(root, n + n_holdout, m.seed, image_size=m.image_size)
    extended = load_benchmark(root)
    for own, ext in zip(bench.profiles, extended.profiles[:n], strict=True):
        if (own.name, dict(own.facts)) != (ext.name, dict(ext.facts)):
            raise BenchmarkError(f"holdout benchmark at {root} disagrees with {bench.root} on {own.profile_id}; "
                                 f"regenerate the benchmark with this version (`mip benchmark make`)")
    new = {p.profile_id for p in extended.profiles[n:]}
    return extended, [it for it in extended.items if it.kind == "qa" and it.profile_id in new]


__all__ = ["holdout_items"]
