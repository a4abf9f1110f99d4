"""Prefect task: generate (or reuse) the synthetic forget benchmark."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mip_core.benchmark import GENERATOR_VERSION, default_n_utility, load_benchmark, make_benchmark
from mip_core.errors import MipError

DEFAULT_IMAGE_SIZE = 32  # make_benchmark's default, which this task always uses


def reusable_benchmark(out_dir: str, profiles: int, seed: int) -> bool:
    """Whether ``out_dir`` holds an intact benchmark equal to what ``make_benchmark_task`` would write."""
    try:
        m = load_benchmark(out_dir).manifest  # checks schema versions and table hashes
    except MipError:
        return False
    return (m.seed, m.n_profiles, m.n_utility, m.image_size, m.generator_version) == (
        seed, profiles, default_n_utility(profiles), DEFAULT_IMAGE_SIZE, GENERATOR_VERSION)


# Files on disk are the cache (``reuse``), so Prefect's result cache is off. One retry covers transient I/O.
@task(name="make-benchmark", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def make_benchmark_task(out_dir: str, profiles: int, seed: int, reuse: bool = True) -> str:
    """Write the benchmark to ``out_dir`` and return ``out_dir``.

    Generation is deterministic, so with ``reuse`` a matching benchmark already there is kept as is: its bytes
    would be the same, and downstream models trained on it stay valid.
    """
    logger = get_run_logger()
    if reuse and reusable_benchmark(out_dir, profiles, seed):
        logger.info("reusing benchmark %s (%d profiles, seed %d)", out_dir, profiles, seed)
        return out_dir
    manifest = make_benchmark(out_dir, profiles, seed, image_size=DEFAULT_IMAGE_SIZE)
    logger.info("wrote benchmark %s: %d profiles, seed %d, %d items", out_dir, manifest.n_profiles,
                manifest.seed, manifest.counts["items"])
    return out_dir
