"""Ray-sharded attribution on a local in-process cluster: shards reduce to the single-process path graph.

A tiny random Qwen2.5-VL (its tokenizer trained on the benchmark's corpus) and a 6-person benchmark; the paths
need not be meaningful, only identical however the items are split.
"""

from __future__ import annotations

import contextlib

import json
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import ray
from ray.exceptions import RayActorError, RayTaskError

from mip_core.attribution import AttributionConfig, attribute_items
from mip_core.benchmark import load_benchmark, make_benchmark
from mip_core.modeling import build_tiny, load_model, save_model
from mip_core.path_graph import reduce_paths
from mip_core.parquet_io import read_item_paths
from mip_core.service.shards import ActorStartError, ShardAttemptError, ShardError, ShardOOM
from tasks.actors import _final_error, _Plan, attribute_batch, shard_uri

from ray_env import ray_test_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CFG = {"steps": 2, "top_k": 3, "batch_items": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model, benchmark, the (item, request) pairs and the reference graph, inside a local Ray cluster."""
    root = tmp_path_factory.mktemp("ray_attr")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ray_test_env(root, ray_tmp).items():
            mp.setenv(key, value)
        make_benchmark(root / "bench", 6, seed=0)
        bench = load_benchmark(root / "bench")
        model, processor = build_tiny("qwen2_5_vl", size="test", seed=1)
        save_model(model, processor, str(root / "model"))
        forget = bench.split_items("forget", forget_pct=15)[:8]
        assert len(forget) == 8 and {it.modality for it in forget} == {"text", "multimodal"}
        pairs = [(it.item_id, "r1" if n < 4 else "r2") for n, it in enumerate(forget)]
        pairs.append((forget[5].item_id, "r3"))  # one item asked for by two requests

        loaded = load_model(str(root / "model"))
        paths, failures = attribute_items(loaded.model, loaded.adapter, loaded.processor, bench, forget,
                                          AttributionConfig(**CFG), request_ids=dict(pairs[:8]))
        assert failures == []
        paths.append(replace(paths[5], request_id="r3"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield {"root": root, "model": str(root / "model"), "bench": str(root / "bench"), "pairs": pairs,
                   "paths": paths}
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _reference(world, run_id):
    return reduce_paths(world["paths"], run_id=run_id)


def assert_same_graph(got, expected):
    """Same neurons, support and requests; scores equal up to float32 rounding.

    Scores are not bit-identical: an item's batch mates set the padded length, and so the float32 summation
    order of its forward/backward (relative differences about 2e-7 here).
    """
    assert got.run_id == expected.run_id
    by_site = {n.site_key: n for n in expected.nodes}
    assert sorted(n.site_key for n in got.nodes) == sorted(by_site)
    for node in got.nodes:
        ref = by_site[node.site_key]
        assert (node.support, node.request_ids) == (ref.support, ref.request_ids), node
        assert node.score_sum == pytest.approx(ref.score_sum, rel=1e-5, abs=1e-12), node
        assert node.score_max == pytest.approx(ref.score_max, rel=1e-5, abs=1e-12), node


def test_two_actors_shards_reduce_to_the_single_process_graph(world, tmp_path):
    logs: list[str] = []
    out = str(tmp_path / "shards")
    results = attribute_batch(world["model"], world["bench"], world["pairs"], out, run_id="b1", n_actors=2,
                              attribution_cfg=CFG, log=logs.append)
    assert [r.shard for r in results] == [0, 1]
    assert [r.n_items for r in results] == [4, 4] and sum(r.n_paths for r in results) == 9
    assert all(r.failures == () for r in results)
    assert len({r.actor for r in results}) == 2  # two processes did the work
    for k, r in enumerate(results):
        assert r.uri == shard_uri(out, k)
        table = pads.dataset(r.uri, format="parquet", partitioning="hive").to_table()
        assert table.num_rows == sum(len(p.nodes) for p in read_item_paths(r.uri))
        assert Path(f"{r.uri}.failures.json").read_text().count('"failures": []') == 1
    graph = reduce_paths(read_item_paths([r.uri for r in results]), run_id="b1")
    assert len(graph) > 0
    assert_same_graph(graph, _reference(world, "b1"))
    assert graph.requests() == ["r1", "r2", "r3"]
    assert any("2 shards on 2 actors" in line for line in logs)
    assert sum("1 model load(s)" in line for line in logs) == 2


def test_a_shard_failing_twice_names_the_shard_and_a_bad_model_fails_fast(world, tmp_path):
    logs: list[str] = []
    (tmp_path / "file").write_text("not a folder")  # every shard's write fails under it, on either actor
    # Ray retries the shard once on its actor; the error names the shard, both tries' errors and what to do
    with pytest.raises(ShardError, match=r"shard ([01]) \(items .*output .*/file/out/shard-000\1\) failed twice: "
                                         r"\w*Error.*retry: \w*Error.*Check the actor logs"):
        attribute_batch(world["model"], world["bench"], world["pairs"][:2], str(tmp_path / "file" / "out"),
                        run_id="b3", n_actors=2, attribution_cfg=CFG, log=logs.append)

    with pytest.raises(ActorStartError, match=r"could not start .*ModelLoadError: model folder .* not exist"):
        attribute_batch(str(tmp_path / "no-model"), world["bench"], world["pairs"][:2], str(tmp_path / "out"),
                        run_id="b3", n_actors=1, attribution_cfg=CFG, log=logs.append)
    assert attribute_batch(world["model"], world["bench"], [], str(tmp_path / "none"), run_id="b3",
                           n_actors=2, log=logs.append) == []


def test_shards_on_s3_with_model_and_benchmark_on_s3(world, s3_endpoint):
    # The Ray cluster started before this fixture set the AWS variables: only runtime_env gets them to actors.
    fs = s3_endpoint.fs
    model_uri = s3_endpoint.uri("ray", "model")
    bench_uri = s3_endpoint.uri("ray", "bench")
    fs.put(world["model"].rstrip("/") + "/", model_uri.removeprefix("s3://") + "/", recursive=True)
    fs.put(world["bench"].rstrip("/") + "/", bench_uri.removeprefix("s3://") + "/", recursive=True)
    out = s3_endpoint.uri("ray", "batch", "shards")
    # capped: more shards than actors, so each actor serves two and loads the model once; three ids are not
    # in the benchmark: failures, not errors, and the last shard has nothing but failures (empty dataset)
    unknown = [(f"no-such-item-{n}", "r9") for n in range(3)]
    logs: list[str] = []
    results = attribute_batch(model_uri, bench_uri, world["pairs"] + unknown, out, run_id="b4", n_actors=2,
                              attribution_cfg=CFG, max_shard=3, endpoint_url=s3_endpoint.endpoint_url,
                              log=logs.append)
    assert [r.uri for r in results] == [shard_uri(out, k) for k in range(4)]
    assert [r.n_items for r in results] == [3, 3, 3, 2] and [r.n_paths for r in results] == [3, 4, 2, 0]
    ids = [u for u, _ in unknown]
    assert [[i for i, _ in r.failures] for r in results] == [[], [], ids[:1], ids[1:]]
    assert "not in the benchmark" in results[2].failures[0][1]
    assert len({r.actor for r in results}) == 2
    summaries = [re.search(r"on cpu \(1 threads\): (\d) shards, (\d) model load", line) for line in logs]
    assert sorted(int(m[1]) for m in summaries if m) in ([2, 2], [1, 3])
    assert all(int(m[2]) == 1 for m in summaries if m)
    for r in results:
        path = r.uri.removeprefix("s3://")
        fs.invalidate_cache()
        failures = json.loads(fs.cat_file(f"{path}.failures.json"))
        assert [f["item_id"] for f in failures["failures"]] == [i for i, _ in r.failures]
        rows = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").count_rows()
        assert (rows > 0) == (r.n_paths > 0)  # the all-failures shard is an empty dataset, still readable
    graph = reduce_paths(read_item_paths([r.uri for r in results], endpoint_url=s3_endpoint.endpoint_url),
                         run_id="b4")
    assert_same_graph(graph, _reference(world, "b4"))
    # both actors share one host cache: one folder per remote prefix, no leftover temp folder
    cached = sorted(p.name for p in (world["root"] / "cache" / "models").iterdir() if p.is_dir())
    assert len(cached) == 2 and not any(".tmp-" in name for name in cached)


def test_an_actor_killed_with_its_shard_is_replaced_and_the_shard_retried(world, tmp_path):
    """SIGKILL one actor's process right after the pool reports ready, as the shards are dispatched: Ray restarts
    the actor (a new process, one model load) and retries its shard there; the graph is the single-process one."""
    import psutil

    killed: list[int] = []

    def log_and_kill(line: str) -> None:
        logs.append(line)
        if "actors ready" in line and not killed:
            victims = []  # this test's cluster only (the raylet and its workers descend from this process)
            for p in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if (p.cmdline() or [""])[0].startswith("ray::AttributionActor"):
                        victims.append(p)
            assert len(victims) == 2, victims
            victims[0].kill()
            victims[0].wait(10)
            killed.append(victims[0].pid)

    logs: list[str] = []
    results = attribute_batch(world["model"], world["bench"], world["pairs"], str(tmp_path / "shards"),
                              run_id="b5", n_actors=2, attribution_cfg=CFG, log=log_and_kill)
    restarted = [line for line in logs if "restarted by Ray" in line]
    assert killed and len(restarted) == 1 and "1 shards, 1 model load(s)" in restarted[0], logs
    assert [r.shard for r in results] == [0, 1] and all(r.failures == () for r in results)
    assert str(killed[0]) not in {r.actor.rsplit(":", 1)[-1] for r in results}  # the dead one did no shard
    graph = reduce_paths(read_item_paths([r.uri for r in results]), run_id="b5")
    assert_same_graph(graph, _reference(world, "b5"))


def test_a_final_error_names_the_shard_and_a_shard_oom_passes_through():
    """What reaches the driver after Ray's retries: the actor's ShardOOM (never retried) as is; a retried error with
    both tries' errors; a retry that died with its actor, named through the actor running it."""
    plan = _Plan({i: [(i, "r1")] for i in "abc"}, [range(0, 2), range(2, 3)], "s3://x/s", "b6")
    oom = ShardOOM("attribution shard 1 (output s3://x/s/shard-0001) ran out of memory on actor h:1, not retried")
    assert _final_error(RayTaskError("score", "tb", oom), plan, {}) is oom
    twice = _final_error(RayTaskError("score", "tb", ShardAttemptError(1, "OSError: b", "OSError: a")), plan, {})
    assert str(twice).startswith("attribution shard 1 (items 2..2 of 3, first 'c'; output s3://x/s/shard-0001) "
                                 "failed twice: OSError: a; retry: OSError: b. Check the actor logs")
    after_death = _final_error(RayTaskError("score", "tb", ShardAttemptError(0, "OSError: b")), plan, {})
    assert "shard 0 (items 0..1" in str(after_death) and "failed twice: lost with its actor" in str(after_death)
    died = _final_error(RayActorError(actor_id="ab12", error_msg="The actor died."), plan, {"ab12": 0, "cd34": 1})
    assert isinstance(died, ShardError) and "shard 0 (items 0..1" in str(died), died
    assert "retry: RayActorError" in str(died)
