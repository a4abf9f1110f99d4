"""Attribution actors load the model in the requested dtype (by default the checkpoint's) and report it.

A tiny random Qwen2.5-VL saved in bf16, on a local in-process Ray cluster (CPU only: ``gpus_per_actor`` and the
GPU memory rule do not apply, so ``batch_items`` stays as configured). The dtypes come from the actor process's
own parameters (``ping``).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import ray
import torch

from mip_core.benchmark import load_benchmark, make_benchmark
from mip_core.errors import InputError
from mip_core.modeling import build_tiny, save_model
from tasks.actors import AttributionActor, attribute_batch

from ray_env import ray_test_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CFG = {"steps": 2, "top_k": 3, "batch_items": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bf16 checkpoint, a benchmark and four forget items, inside a local Ray cluster."""
    root = tmp_path_factory.mktemp("ray_dtype")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ray_test_env(root, ray_tmp).items():
            mp.setenv(key, value)
        make_benchmark(root / "bench", 6, seed=0)
        model, processor = build_tiny("qwen2_5_vl", size="test", seed=1)
        model.to(torch.bfloat16).config.dtype = torch.bfloat16
        save_model(model, processor, str(root / "model"))
        forget = load_benchmark(root / "bench").split_items("forget", forget_pct=15)[:4]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield {"model": str(root / "model"), "bench": str(root / "bench"),
                   "pairs": [(it.item_id, "r1") for it in forget]}
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_actors_keep_the_checkpoint_dtype_unless_told(world):
    actors = {dtype: AttributionActor.options(num_cpus=0.5).remote(world["model"], world["bench"], CFG, None,
                                                                    dtype)
              for dtype in ("auto", "float32")}
    try:
        facts = {dtype: ray.get(actor.ping.remote()) for dtype, actor in actors.items()}
    finally:
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
    assert facts["auto"]["param_dtypes"] == ["torch.bfloat16"]
    assert facts["float32"]["param_dtypes"] == ["torch.float32"]
    assert all(f["param_devices"] == ["cpu"] and f["batch_items"] == 2 for f in facts.values())
    assert facts["auto"]["pid"] != facts["float32"]["pid"]  # two processes, each loaded its own copy


def test_attribute_batch_passes_dtype_to_its_actors(world, tmp_path):
    logs: list[str] = []
    results = attribute_batch(world["model"], world["bench"], world["pairs"], str(tmp_path / "out"),
                              run_id="d1", n_actors=1, attribution_cfg=CFG, dtype="float32", gpus_per_actor=4,
                              log=logs.append)
    assert sum(r.n_paths for r in results) == 4 and all(not r.failures for r in results)
    summary = [line for line in logs if "items per pass" in line]
    assert len(summary) == 1 and "weights torch.float32 on cpu, 2 items per pass" in summary[0], logs
    with pytest.raises(InputError, match="dtype must be 'auto' or one of"):
        attribute_batch(world["model"], world["bench"], world["pairs"], str(tmp_path / "bad"), run_id="d2",
                        n_actors=1, dtype="int8")
