"""The gate where the model lives: models are scored on a local Ray actor, never in the flow process.

Measured: the actor's scores equal in-process ``correctness`` on the same model, the work ran in another process
that is gone afterwards, and the flow process's peak memory does not grow by the model's size while gate_task
scores a model of about 270 MB (a control, loading and scoring it in this process afterwards, shows that the
measure would see it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import ray

from mip_core.benchmark import load_benchmark, make_benchmark
from mip_core.modeling import build_tiny, load_model, save_model
from mip_core.service.batch import BatchManifest
from mip_core.service.gate import correct_by_id
from mip_core.service.scores import SCORES_FILE, batch_scores_key, read_scores, version_scores_key
from mip_core.service.store import ServiceStore

from ray_env import ray_test_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# A model whose size is in its vision tower: about 67 M parameters (270 MB in float32). A 32-pixel image is 16
# patches, so scoring stays fast, and every weight is touched (a memory-mapped load alone would not show in RSS).
BIG = """
import sys
from dataclasses import replace
from mip_core.modeling import build_tiny, save_model
from mip_core.modeling.tiny import TINY_SIZES
TINY_SIZES["big-vision"] = replace(TINY_SIZES["test"], vision_width=1024, vision_mlp=4096, vision_heads=16,
                                   vision_depth=4)
save_model(*build_tiny("qwen2_5_vl", size="big-vision", seed=2), sys.argv[1])
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_actor")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ray_test_env(root, ray_tmp).items():
            mp.setenv(key, value)
        (root / "home").mkdir()
        big = subprocess.Popen([sys.executable, "-c", BIG, str(root / "big")])  # never in this process
        make_benchmark(root / "bench", 4, seed=0, n_utility=4)
        save_model(*build_tiny("qwen2_5_vl", size="test", seed=1), str(root / "small"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        assert big.wait(timeout=300) == 0
        try:
            yield {"root": root, "bench_uri": str(root / "bench"), "bench": load_benchmark(root / "bench"),
                   "small": str(root / "small"), "big": str(root / "big")}
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def peak_rss_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak (VmHWM) restarts from the current RSS


def test_the_actor_scores_like_in_process_correctness_in_another_process(world):
    from tasks.gate import score_on_actor

    ids = [it.item_id for it in world["bench"].items if it.kind == "qa"][:16]
    assert {it.modality for it in world["bench"].items if it.item_id in ids} == {"text", "multimodal"}
    logs: list[str] = []
    got = score_on_actor(world["small"], world["bench_uri"], ids, log=logs.append)
    loaded = load_model(world["small"])
    assert got == correct_by_id(loaded.model, loaded.processor, world["bench"], ids)
    [pid] = [int(p) for p in re.findall(r"on actor [^:]+:(\d+) ", " ".join(logs))]
    assert pid != os.getpid()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # killed when done
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}")


def _one_request_batch(store: ServiceStore, world: dict, model: str, version: str, forgotten: str, kept: str
                       ) -> tuple[list[str], list[str], list[str]]:
    """Write batch ``b1``'s manifest: one request forgetting ``forgotten``'s items, on ``version`` of ``model``,
    every other item of ``kept`` and two utility items scored; returns ``(forget, retain, utility)`` item ids."""
    items = world["bench"].items
    forget = [it.item_id for it in items if it.kind == "qa" and it.profile_id == forgotten]
    retain = [it.item_id for it in items if it.kind == "qa" and it.profile_id == kept][::2]
    utility = [it.item_id for it in items if it.kind == "utility"][:2]
    m = BatchManifest(batch_id="b1", target_model=model, base_version=version,
                      base_uri=store.uri(store.model_key(model, version)), dataset_uri=world["bench_uri"],
                      requests=("r1",), rejected={}, forget=tuple((i, "r1") for i in forget),
                      items_of={"r1": tuple(forget)}, edit_retain=(), eval_retain=tuple(retain),
                      eval_utility=tuple(utility))
    store.write_text(store.batch_key("b1", "manifest.json"), m.to_json())
    return forget, retain, utility


def test_gate_task_scores_on_actors_without_the_model_in_this_process(world, tmp_path):
    from prefect.logging import disable_run_logger

    from tasks.service import gate_task

    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("big", world["big"], dataset_uri=world["bench_uri"])
    items = world["bench"].items
    forget, retain, utility = _one_request_batch(store, world, "big", "v0001", "p0000", "p0001")
    model_kb = sum(f.stat().st_size for f in (tmp_path / "store" / "models" / "big" / "v0001").glob("*.safetensors")
                   ) // 1024
    assert model_kb > 250_000
    ids = [*forget, *retain, *utility]
    assert {it.modality for it in items if it.item_id in ids} == {"text", "multimodal"}

    reset_peak_rss()
    start_kb, started = peak_rss_kb(), time.perf_counter()
    with disable_run_logger():
        decision = gate_task.fn(store.root, "b1", world["small"], {"min_forgetting": 0.5}, gpus_per_actor=1,
                                dtype="auto")
    gate_growth_kb, seconds = peak_rss_kb() - start_kb, time.perf_counter() - started
    assert gate_growth_kb < model_kb // 4, (gate_growth_kb, model_kb)

    reset_peak_rss()
    start_kb = peak_rss_kb()
    base = load_model(world["big"])  # the control: the model loaded and scored here does show in the measure
    base_truth = correct_by_id(base.model, base.processor, world["bench"], ids)
    assert peak_rss_kb() - start_kb > model_kb * 0.8, (peak_rss_kb() - start_kb, model_kb)
    del base
    small = load_model(world["small"])
    edited_truth = correct_by_id(small.model, small.processor, world["bench"], ids)

    assert read_scores(store, version_scores_key(store, "big", "v0001")).correct == base_truth
    assert read_scores(store, batch_scores_key(store, "b1")).correct == edited_truth
    assert (tmp_path / "store" / "batches" / "b1" / "scores" / SCORES_FILE).is_file()
    written = store.read_json(store.batch_key("b1", "gate.json"))
    assert json.dumps(written, sort_keys=True) == json.dumps(decision, sort_keys=True)  # NaN != NaN as values
    modality = {it.item_id: it.modality for it in items}
    for name, set_ids in (("forget", forget), ("retain", retain), ("utility", utility)):
        for score in (s for s in decision["scores"] if s["items"] == name):
            kept = [i for i in set_ids if modality[i] == score["modality"]]
            assert score["before"] == pytest.approx(sum(base_truth[i] for i in kept) / len(kept))
            assert score["after"] == pytest.approx(sum(edited_truth[i] for i in kept) / len(kept))
    print(f"gate_task: {seconds:.1f} s, flow peak RSS +{gate_growth_kb / 1024:.0f} MiB for a "
          f"{model_kb / 1024:.0f} MiB model")


def test_an_edited_version_is_also_judged_against_the_registered_model_scored_on_its_own_actor(world, tmp_path):
    """The batch starts from v0002, which an edit published from v0001. The kept sets' figures against the
    registered model are v0001's own correctness, and a request v0002 does not find forgotten is judged against
    v0001 too, scored on its items on an actor (its forget items were never in v0001's cache)."""
    from prefect.logging import disable_run_logger

    from tasks.service import gate_task

    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("tiny", world["small"], dataset_uri=world["bench_uri"])  # v0001: the registered model
    save_model(*build_tiny("qwen2_5_vl", size="test", seed=3), str(tmp_path / "other"))
    store.register_model("tiny", str(tmp_path / "other"), dataset_uri=world["bench_uri"],
                         lineage={"batch_id": "b0"})  # v0002, as an edit publishes it
    items = world["bench"].items
    forget, retain, utility = _one_request_batch(store, world, "tiny", "v0002", "p0002", "p0003")
    with disable_run_logger():  # forgetting everything is asked, so the request is not forgotten by v0002's measure
        decision = gate_task.fn(store.root, "b1", world["small"], {"min_forgetting": 1.0}, gpus_per_actor=1,
                                dtype="auto")

    registered = load_model(world["small"])
    truth = correct_by_id(registered.model, registered.processor, world["bench"], [*forget, *retain, *utility])
    modality = {it.item_id: it.modality for it in items}
    assert decision["registered"]["version"] == "v0001"
    for score in decision["registered"]["scores"]:
        kept = [i for i in (retain if score["items"] == "retain" else utility) if modality[i] == score["modality"]]
        assert score["before"] == pytest.approx(sum(truth[i] for i in kept) / len(kept))
    figures = decision["per_request"]["r1"]
    assert figures["passed"] == 0.0 and figures["registered_before"] == pytest.approx(
        sum(truth[i] for i in forget) / len(forget))
    assert set(read_scores(store, version_scores_key(store, "tiny", "v0001")).correct) >= set(forget)
