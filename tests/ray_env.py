"""Shared by the test modules that start a local Ray cluster."""

from __future__ import annotations

from pathlib import Path


def ray_test_env(root: Path, ray_tmp: str) -> dict[str, str]:
    """The environment of a test module's local Ray cluster: its own short temp dir and home, loopback only, no
    token file or usage stats, one thread, a model cache under ``root``."""
    return {"RAY_TMPDIR": ray_tmp, "HOME": str(root / "home"), "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "MIP_CACHE_DIR": str(root / "cache"), "MIP_THREADS": "1", "OMP_NUM_THREADS": "1"}
