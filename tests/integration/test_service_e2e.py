"""The nightly service end to end: S3 (moto on 127.0.0.1), a Prefect server, a deployment run by a process
worker, Ray attribution actors and a 2-rank DeepSpeed ZeRO-3 edit job over gloo.

The model is registered the way an operator without a training benchmark would: with plain keep-set files
(``mip benchmark export`` writes them here) and the worker runs with ``MIP_NO_BENCHMARK=1``, so any code path
that opened a benchmark would fail the batch. Requests name people by name and photo, and arrive three ways (the
CLI, the ``submit-request`` flow, the store), one of them unprocessable. The nightly deployment is triggered
through the API and executed by a real ``prefect worker``; then everything the issue promises is read back from
S3: one batch, the probes it asked, the path graph through ``pyarrow.dataset``, the edited model through
``from_pretrained``, per-request verdicts, and a terminal record with a report for every request. The gate runs on
the service's own floors; the test scores the starting and edited models itself and checks the gate's verdict
(published, or held back with the floor it missed) is the one those floors give. Last, the edited model is scored
on the benchmark itself (in the test, not the service): the named people's facts are forgotten, and, where it was
published, other people's kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gate_verdict
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mip_core.benchmark import load_benchmark
from mip_core.cli import main
from mip_core.modeling import load_model
from mip_core.service.gate import GateConfig
from mip_core.service.requests import ForgetRequest
from mip_core.service.store import ServiceStore
from mip_core.storage import filesystem

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Small but real: 2 actors, 2 DeepSpeed ranks, an edit budget that fits a CI minute, the service's own gate floors.
# On this 1.5 M-parameter test model the verdict is not a given: its few held-out items (10 general questions and
# 15-18 other people's items per modality) share the vision neurons of every person and move by a tenth an item
# (measured on 2026-12-04, the named people forgotten every time: this run held back at utility 0.7 in both
# modalities, image retention 0.83; in-process edits of 30-60 steps at image utility 0.4-0.5, retention 0.67). The
# test does not bet on either outcome: gate_verdict scores both models itself and checks the verdict and every
# record follow from the floors. One batch, not split when held back (test_service_faults covers the split), which
# keeps the run's time. The edit is the fixed-budget one these figures were measured with (60 steps at 3e-2, no
# check): the adaptive default (at most 900 small steps) does not fit a CI minute, and 60 of its steps forgot 0.23.
SECRET = "mip-e2e-secret-7f3a9c0d5b"
SPEC = {"n_actors": 2, "launcher": "deepspeed", "ranks": 2, "attribution": {"steps": 2, "top_k": 8},
        "edit": {"rmisu": {"steps": 60, "batch_size": 4, "lr": 3e-2, "check_every": 0}}, "retain_limit": 40,
        "split_held_back": False}


@pytest.fixture(scope="module")
def vanilla(trained_tiny):
    """(model dir, bench dir) of the session's tiny model trained on 8 profiles (conftest.trained_tiny)."""
    return trained_tiny


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A throwaway Prefect server (SQLite, own home) and the settings a subprocess needs to reach it."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        get_current_settings,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=180):
            yield get_current_settings().to_environment_variables(exclude_unset=True)


@pytest.fixture
def ray_tmp():
    """Ray's session folder: a short path, since its AF_UNIX socket paths must stay within 107 bytes."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def request(request_id: str, subjects: list) -> dict:
    return {"request_id": request_id, "target_model": "tiny", "subjects": subjects,
            "requester": "dpo@example.com", "reason": "right_to_be_forgotten"}


def person(bench, index: int, photo_dir: Path) -> dict:
    """A person as a requester knows them: a name and a photo file (no benchmark id)."""
    profile = bench.profiles[index]
    photo = photo_dir / f"photo-{index}.png"
    photo.write_bytes((Path(bench.root) / profile.image).read_bytes())
    return {"name": profile.name, "photos": [str(photo)]}


def mc_accuracy(model_dir: str, bench, profile_ids: set[str]) -> float:
    """Multiple-choice accuracy of a model on the benchmark's qa items of ``profile_ids``."""
    from mip_core.evaluation.runner import multiple_choice

    loaded = load_model(model_dir, device="cpu")
    items = [it for it in bench.items if it.kind == "qa" and it.profile_id in profile_ids]
    return sum(multiple_choice(loaded.model, loaded.processor, bench, items)) / len(items)


def test_nightly_deployment_forgets_the_requested_people(vanilla, prefect_api, s3_endpoint, tmp_path, ray_tmp):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment

    from flows.service import submit_request

    model_dir, bench_dir = vanilla
    root = s3_endpoint.uri("e2e")
    bench = load_benchmark(bench_dir)
    keep = tmp_path / "keepsets"
    assert main(["benchmark", "export", "--bench", bench_dir, "--out", str(keep)]) == 0
    assert main(["models", "register", "--root", root, "--name", "tiny", "--model", model_dir, "--retain",
                 str(keep / "retain.jsonl"), "--utility", str(keep / "utility.jsonl"), "--templates",
                 str(keep / "templates.jsonl")]) == 0
    store = ServiceStore(root)
    assert store.model_info("tiny")["dataset_uri"] is None and store.model_info("tiny")["keepsets"]
    alice, bob = person(bench, 1, tmp_path), person(bench, 5, tmp_path)

    # 1. three ways in: the CLI, the submit-request flow, the store; a malformed request changes nothing
    (tmp_path / "a.json").write_text(json.dumps(request("req-a", [alice])))
    assert main(["submit", str(tmp_path / "a.json"), "--root", root]) == 0
    (tmp_path / "bad.json").write_text(json.dumps({**request("req-bad", [bob]), "reason": "because"}))
    assert main(["submit", str(tmp_path / "bad.json"), "--root", root]) == 2
    assert submit_request(ForgetRequest(**request("req-b", [bob])), root=root) == "req-b"
    store.submit(ForgetRequest(**request("req-ghost", ["p0999"])))
    assert sorted(r.request.request_id for r in store.list("pending")) == ["req-a", "req-b", "req-ghost"]

    # 2. deploy from prefect.yaml, trigger through the API, let a real process worker run it
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="mip-process", type="process"))
    env = {k: v for k, v in os.environ.items() if k != "MIP_REPO_DIR"} | prefect_api
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "-n", "nightly-unlearning"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    run = run_deployment("nightly-unlearning/nightly-unlearning", parameters={"spec": {**SPEC, "root": root}},
                         timeout=0)
    worker_env = env | {"AWS_SECRET_ACCESS_KEY": SECRET,  # moto accepts any: this one must never be written
                        "MIP_REPO_DIR": str(ROOT), "MIP_THREADS": "1", "OMP_NUM_THREADS": "1",
                        "GLOO_SOCKET_IFNAME": "lo", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                        "RAY_TMPDIR": ray_tmp, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
                        "MIP_CACHE_DIR": str(tmp_path / "cache"), "MIP_NO_BENCHMARK": "1"}
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", "mip-process", "--run-once"],
                            cwd=tmp_path, env=worker_env, capture_output=True, text=True, timeout=900)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), f"{state}\n{worker.stdout[-6000:]}\n{worker.stderr[-6000:]}"

    # 3. one batch holds all three; the unknown person is rejected with the reason; the others end as the service's
    # floors say for the scores the test measures itself: done on v0002, or failed naming the floor missed
    records = {r: store.get(r) for r in ("req-a", "req-b", "req-ghost")}
    batch_ids = {rec.batch_id for rec in records.values()}
    assert len(batch_ids) == 1 and None not in batch_ids
    [batch_id] = batch_ids
    assert records["req-ghost"].state == "rejected" and "p0999" in records["req-ghost"].reason
    assert records["req-ghost"].report_uri.endswith("/report.md")  # rejected requests are in the report too
    gate = store.read_json(store.batch_key(batch_id, "gate.json"))
    verdict = gate_verdict.measure(store, batch_id)
    gate_verdict.check(store, batch_id, gate, verdict, "v0002")
    for r in ("req-a", "req-b"):
        assert records[r].report_uri.endswith(f"batches/{batch_id}/report.md")
    if verdict.published:
        lineage = store.model_info("tiny")
        assert lineage["batch_id"] == batch_id and sorted(lineage["requests"]) == ["req-a", "req-b"]
        assert lineage["keepsets"] == store.model_info("tiny", "v0001")["keepsets"]  # the new version keeps them
    else:
        assert store.versions("tiny") == ["v0001"]

    # 3b. what the service asked about each person is stored with the batch, and each verdict is the person's own
    fs, path = filesystem(store.uri(store.batch_key(batch_id, "probes.parquet")), s3_endpoint.endpoint_url)
    probes = pq.read_table(fs.open(path, "rb")).to_pylist()
    for r, who in (("req-a", alice), ("req-b", bob)):
        mine = [p for p in probes if p["request_id"] == r and p["kept"]]
        assert {p["use"] for p in mine} == {"edit", "held_out"}, probes
        assert any(who["name"] in p["question"] for p in mine) and any(p["image"] for p in mine)
        figures = gate["per_request"][r]
        assert figures["after"] < figures["before"], figures
        assert "test_after" in figures  # held-out probes reported beside the request's own
        assert figures["logprob_after"] < figures["logprob_before"]  # the answers it gave became less likely

    # 4. the path graph is a Parquet dataset pyarrow reads straight from S3; it holds both people's paths
    fs, path = filesystem(store.uri(store.batch_key(batch_id, "path_graph")), s3_endpoint.endpoint_url)
    table = ds.dataset(path, filesystem=fs, partitioning="hive").to_table()
    assert table.num_rows > 0 and {"tower", "layer", "neuron"} <= set(table.column_names)
    shards = store.read_json(store.batch_key(batch_id, "shards.json"))
    assert len(shards) == 2 and len({s["actor"] for s in shards}) == 2  # two actors, one shard each

    # 5. the edited model (the published version, else the held-back candidate) loads with from_pretrained from
    # S3, and the gate saw forgetting (its kept sets were judged in 3)
    edited = store.uri(store.model_key("tiny", "v0002") if verdict.published else store.batch_key(batch_id, "edited"))
    assert load_model(edited).adapter.n_layers("language") > 0
    for s in gate["scores"]:
        if s["items"] == "forget":
            assert s["after"] < s["before"], s
    log = store.read_text(store.batch_key(batch_id, "logs", "edit.log"))
    assert '"world_size": 2' in log and '"zero_stage": 3' in log, log[-2000:]

    # 6. every request has its report, and the run carries it as an artifact
    report = store.read_text(store.batch_key(batch_id, "report.md"))
    for r in records:
        assert f"`{r}`" in report
    assert alice["name"] not in report  # ids and metrics, not the people's data
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    keys = {a.key for a in artifacts}
    assert f"batch-{batch_id.lower()}" in keys and "nightly-unlearning" in keys

    # 7. the worker's S3 secret is in no stored object, no line the worker printed, no Prefect log or artifact
    fs.invalidate_cache()
    stored = fs.find(root.removeprefix("s3://"))
    assert len(stored) > 20 and not [p for p in stored if SECRET.encode() in fs.cat_file(p)]
    with get_client(sync_client=True) as client:
        logs = client.read_logs()
    assert logs and not any(SECRET in log.message for log in logs)
    assert not any(SECRET in (a.data or "") for a in artifacts)
    assert SECRET not in worker.stdout + worker.stderr

    # 8. measured on the benchmark (here, never in the service): the named people are forgotten and, where the gate
    # published the edit, other people's facts kept at its retention floor
    named = {bench.profiles[1].profile_id, bench.profiles[5].profile_id}
    others = {p.profile_id for p in bench.profiles} - named
    # a delta version either way: load_model applies its neurons
    before_named, after_named = mc_accuracy(model_dir, bench, named), mc_accuracy(edited, bench, named)
    assert after_named <= before_named - 0.3, (before_named, after_named)
    if verdict.published:
        before_others, after_others = mc_accuracy(model_dir, bench, others), mc_accuracy(edited, bench, others)
        assert after_others >= GateConfig().min_retention * before_others, (before_others, after_others)
