"""`make gpu-check`'s script in its --dry-run mode: the GPU check's whole path on CPU with a tiny shape.

On the GPU machine the same code builds a Qwen2.5-VL-7B-shaped model; here a tiny one goes through
attribution, a 1-rank ZeRO-3 edit job (gloo instead of NCCL), the gate and a sharded publish, and the one JSON
line of figures must hold measured, plausible values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_plausible_figures(tmp_path):
    env = dict(os.environ, MIP_THREADS="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               HOME=str(tmp_path / "home"))
    argv = [sys.executable, "benches/gpu_check.py", "--dry-run", "--work", str(tmp_path / "work")]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu-check: torch") and "CUDA available" in lines[0]
    [line] = [ln for ln in lines if ln.startswith("{")]  # exactly one JSON line of figures
    out = json.loads(line)
    assert out["schema"] == "mip-gpu-check/1" and out["dry_run"] and out["ok"], out["errors"]
    assert out["errors"] == {}
    model = out["model"]
    assert model["params"] == model["params_meta"] > 0
    assert model["model_bytes"] >= 2 * model["params"]  # bf16 on disk

    att = out["attribution"]
    assert att["attributed"] == att["items"] > 0 and att["failures"] == []
    assert att["items_per_s"] > 0 and att["seconds"] > 0
    assert att["peak_bytes"] > model["model_bytes"] and att["dtype"] == "bfloat16"  # loaded as stored
    assert att["graph_nodes"] > 0

    edit = out["edit"]
    assert edit["world_size"] == 1 and edit["zero_stage"] == 3 and edit["backend"] == "gloo"
    assert edit["steps"] == 1 and edit["neurons"] > 0
    assert edit["partitioned"] is True  # the ranks' parameters were ZeRO-3 partitions (read from the model)
    assert edit["peak_bytes"] > model["model_bytes"] and edit["process_group_closed"]
    assert edit["output"]["own_bytes"] > 0 and edit["output"]["linked_bytes"] > 0  # a neuron delta + links

    gate = out["gate"]
    assert gate["items"] > 0 and gate["items_per_s"] > 0 and isinstance(gate["passed"], bool)
    assert all(0 <= v <= 1 for pair in gate["scores"].values() for v in pair)

    pub = out["publish"]
    assert pub["version"] == "v0002" and pub["shards"] == model["shards"] and pub["deltas"] == 1
    assert pub["linked_bytes"] >= model["model_bytes"]  # every shard a hard link: no bytes copied
    assert pub["own_bytes"] < 0.1 * model["model_bytes"]  # only the version's records are written
    assert 0 < out["wall_s"] < 240
