"""The Prefect layer: the deployment file resolves, tasks reuse what is on disk, and the flow really runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.params import VanillaSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A throwaway Prefect server (subprocess, SQLite) with its home, storage and profiles under a tmp dir.

    Prefect 3 reads its settings once at import, so the home is switched with ``temporary_settings``; the
    harness hands the current settings to the server subprocess through its environment.
    """
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield home


def test_prefect_yaml_deployment_resolves_to_the_flow(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert project["name"] == "mip-editor" and project["prefect-version"] == "3.9.1"
    assert not project.get("build") and not project.get("push")
    [pull] = project["pull"]
    assert "directory" in pull["prefect.deployments.steps.set_working_directory"]
    deployments = {d["name"]: d for d in project["deployments"]}
    dep = deployments["mip-vanilla"]
    assert dep["work_pool"]["name"] == "mip-process" and dep["work_pool"]["work_queue_name"] == "default"
    spec = VanillaSpec(**dep["parameters"]["spec"])  # the defaults are valid parameters
    assert spec.workdir == "/var/lib/mip/vanilla"

    monkeypatch.chdir(ROOT)  # entrypoints are relative to the pulled working directory
    loaded = load_flow_from_entrypoint(dep["entrypoint"])
    assert loaded.name == "mip-vanilla"
    schema = loaded.parameters.model_dump()
    assert schema["required"] == ["spec"]
    spec_schema = schema["definitions"]["VanillaSpec"]["properties"]
    assert spec_schema["arch"]["enum"] == ["qwen2_5_vl", "qwen2_vl", "llava"]
    assert spec_schema["forget_pct"]["enum"] == [5, 10, 15]
    assert all(prop.get("description") for prop in spec_schema.values())
    assert isinstance(loaded.validate_parameters(dep["parameters"])["spec"], VanillaSpec)  # as a worker would


def test_spec_validates_and_maps_to_train_config(monkeypatch):
    monkeypatch.setenv("MIP_THREADS", "2")
    cfg = VanillaSpec(workdir="w", steps=300, minutes=2.5, seed=7).train_config()
    assert (cfg.steps, cfg.max_minutes, cfg.seed, cfg.threads) == (300, 2.5, 7, 2)
    for bad in ({"profiles": 3}, {"forget_pct": 7}, {"arch": "gpt2"}, {"minutes": 0}, {"stepz": 5}):
        with pytest.raises(ValidationError):
            VanillaSpec(workdir="w", **bad)


def test_benchmark_task_reuses_only_a_matching_benchmark(tmp_path):
    from prefect.logging import disable_run_logger

    from tasks.benchmark import make_benchmark_task

    out = str(tmp_path / "bench")
    manifest = Path(out, "manifest.json")

    def inode() -> int:  # a regenerated benchmark is swapped in as a new directory
        return manifest.stat().st_ino

    with disable_run_logger():
        assert make_benchmark_task.fn(out, 4, 1, True) == out
        first = inode()
        make_benchmark_task.fn(out, 4, 1, True)
        assert inode() == first  # same seed and size: kept
        make_benchmark_task.fn(out, 4, 1, False)
        assert inode() != first  # reuse off: rebuilt
        second = inode()
        make_benchmark_task.fn(out, 4, 2, True)
        assert inode() != second and json.loads(manifest.read_text())["seed"] == 2  # other seed: rebuilt


def test_train_task_keeps_a_model_trained_with_the_same_settings(tmp_path):
    import dataclasses

    from prefect.logging import disable_run_logger

    from mip_core.benchmark import BenchmarkSchemaError
    from mip_core.training import TrainConfig
    from tasks.train import train_vanilla_task

    out = tmp_path / "vanilla"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    config = json.loads(json.dumps(dataclasses.asdict(TrainConfig(steps=10))))
    (out / "training_log.json").write_text(json.dumps({"arch": "qwen2_5_vl", "size": "test", "config": config}))
    with disable_run_logger():  # the benchmark does not exist: it must not even be opened
        kept = train_vanilla_task.fn(str(tmp_path / "nope"), str(out), "qwen2_5_vl", "test", {"steps": 10}, True)
    assert kept == str(out)
    assert (out / "model.safetensors").read_bytes() == b"weights"
    # other settings (or no log, i.e. an unfinished save) retrain: here that means opening the missing benchmark
    for arch, cfg in (("qwen2_5_vl", {"steps": 11}), ("llava", {"steps": 10})):
        with disable_run_logger(), pytest.raises(BenchmarkSchemaError):
            train_vanilla_task.fn(str(tmp_path / "nope"), str(out), arch, "test", cfg, True)
    (out / "training_log.json").unlink()
    with disable_run_logger(), pytest.raises(BenchmarkSchemaError):
        train_vanilla_task.fn(str(tmp_path / "nope"), str(out), "qwen2_5_vl", "test", {"steps": 10}, True)


@pytest.mark.slow
def test_prefect_deploy_registers_the_deployment(prefect_server):
    """`prefect deploy` itself accepts prefect.yaml: entrypoint, parameters (vs the flow's schema), pull."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import get_current_settings

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="mip-process", type="process"))
    env = {k: v for k, v in os.environ.items() if k != "MIP_REPO_DIR"}  # resolved by the worker, not here
    env.update(get_current_settings().to_environment_variables(exclude_unset=True))  # harness API URL, home
    out = subprocess.run([str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "-n",
                          "mip-vanilla"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("mip-vanilla/mip-vanilla")
    assert dep.entrypoint == "flows/vanilla.py:vanilla" and dep.work_pool_name == "mip-process"
    assert dep.parameters["spec"]["workdir"] == "/var/lib/mip/vanilla"
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                               {"directory": "{{ $MIP_REPO_DIR }}"}}]


@pytest.mark.slow
def test_vanilla_flow_runs_and_reuses(prefect_server, tmp_path, monkeypatch):
    from flows.vanilla import vanilla

    monkeypatch.setenv("MIP_THREADS", "1")
    spec = VanillaSpec(workdir=str(tmp_path / "work"), profiles=8, size="test", steps=300, minutes=5,
                       forget_pct=10)
    out_json = vanilla(spec)
    assert out_json == str(tmp_path / "work" / "vanilla_eval.json")
    rows = json.loads(Path(out_json).read_text())["rows"]
    values = {(r["split"], r["modality"], r["metric"]): r["value"] for r in rows}
    for split in ("forget", "retain"):
        for modality in ("multimodal", "text"):
            assert {(split, modality, "accuracy"), (split, modality, "rougeL")} <= values.keys()
    # chance is 0.25 (4 options); 300 steps on 8 profiles memorise the retain split
    assert values[("retain", "multimodal", "accuracy")] >= 0.6, rows
    assert values[("retain", "text", "accuracy")] >= 0.6, rows
    log = json.loads((tmp_path / "work" / "vanilla" / "training_log.json").read_text())
    assert log["steps_done"] == 300 and log["config"]["steps"] == 300

    weights = tmp_path / "work" / "vanilla" / "model.safetensors"
    bench_manifest = tmp_path / "work" / "bench" / "manifest.json"
    before = (weights.stat().st_mtime_ns, bench_manifest.stat().st_mtime_ns)
    os.remove(out_json)
    assert vanilla(spec.model_copy(update={"reuse": True})) == out_json
    assert (weights.stat().st_mtime_ns, bench_manifest.stat().st_mtime_ns) == before  # nothing rebuilt
    assert json.loads(Path(out_json).read_text())["rows"] == rows  # same model, same evaluation

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the table is visible in the UI, once per run
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mip-vanilla-eval"])))
    assert len(artifacts) == 2 and all("retain   multimodal" in a.data for a in artifacts)
