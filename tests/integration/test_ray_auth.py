"""The service's local Ray cluster keeps token authentication, without Ray's per-batch warning and without
writing a token file under the user's home."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_a_local_cluster_uses_a_per_process_token_and_writes_no_token_file(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env |= {"HOME": str(tmp_path / "home"), "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    code = ("from tasks.actors import ensure_ray; import os, ray; ensure_ray(1); "  # as a flow imports them
            "f = ray.remote(lambda: os.environ.get('RAY_AUTH_MODE')); "
            "print('mode', os.environ['RAY_AUTH_MODE'], ray.get(f.remote())); ray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mode token token" in out.stdout  # the driver and Ray's worker processes both run with token auth
    assert "Token authentication is enabled" not in out.stderr and "auth_token" not in out.stderr
    assert not list((tmp_path / "home").rglob("auth_token"))
