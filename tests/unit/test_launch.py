"""The edit job's launcher: argv lists, DeepSpeed configs, the EditSpec file, and how a failed job reports."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import tasks.launch as launch
from mip_core.parallel.zero3_slices import gather_params
from mip_core.parallel.data_parallel import average_gradients, global_share, rank_slice, world
from mip_core.entrypoints.edit import EditSpec, fit_to_checkpoint, read_spec, write_spec
from mip_core.errors import InputError, MipError
from mip_core.entrypoints.edit_plan import check_ds_config, validate_edit_plan
from tasks.launch import EditJobError, ds_config_for, edit_argv, job_env, launch_edit, zero3_config

INFRA = Path(__file__).resolve().parents[2] / "infra" / "deepspeed"


def _spec(tmp_path: Path, **changes) -> EditSpec:
    spec = EditSpec(model_uri=str(tmp_path / "model"), bench_uri=str(tmp_path / "bench"),
                    forget=[["p0000-name-mm-qa", "req-1"], ["p0000-hobby-text-qa", "req-1"]],
                    retain_item_ids=["p0001-name-mm-qa"], graph_uri=str(tmp_path / "graph"),
                    output_uri=str(tmp_path / "edited"), edit={"rmisu": {"steps": 3}},
                    lineage={"batch_id": "b1", "requests": ["req-1"]})
    return replace(spec, **changes)


# ---------------------------------------------------------------------------------------------------- argv
def test_deepspeed_argv_is_a_list_with_the_launcher_flags():
    argv = edit_argv("s3://bucket/batches/b 1/edit_config.json", launcher="deepspeed", n_ranks=2,
                     master_port=29555, ds_config_uri="/tmp/ds.json")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert Path(argv[0]).name == "deepspeed" and Path(argv[0]).parent == Path(sys.executable).parent
    assert argv[1:] == ["--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", "29555", "--module",
                        "mip_core.entrypoints.edit", "--spec", "s3://bucket/batches/b 1/edit_config.json",
                        "--ds-config", "/tmp/ds.json"]  # a URI with a space stays one argument: no shell
    with_hosts = edit_argv("spec.json", launcher="deepspeed", n_ranks=8, hostfile="/etc/mip/hostfile",
                           master_addr="10.0.0.1")
    assert with_hosts[1:3] == ["--hostfile", "/etc/mip/hostfile"]
    assert with_hosts[with_hosts.index("--master_addr") + 1] == "10.0.0.1"
    assert int(with_hosts[with_hosts.index("--master_port") + 1]) > 0  # a free port when none is given


def test_torchrun_argv_and_bad_launch_arguments():
    argv = edit_argv("spec.json", launcher="torchrun", n_ranks=3, master_port=29556)
    assert Path(argv[0]).name == "torchrun"
    assert argv[1:] == ["--nproc_per_node", "3", "--master_addr", "127.0.0.1", "--master_port", "29556", "-m",
                        "mip_core.entrypoints.edit", "--spec", "spec.json"]
    with pytest.raises(InputError, match="n_ranks=0"):
        edit_argv("spec.json", launcher="deepspeed", n_ranks=0)
    with pytest.raises(InputError, match="launcher='mpirun'"):
        edit_argv("spec.json", launcher="mpirun", n_ranks=2)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="hostfile"):
        edit_argv("spec.json", launcher="torchrun", n_ranks=2, hostfile="hosts")


def test_job_env_keeps_the_job_on_loopback_and_cpu_by_default(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    env = job_env({"OMP_NUM_THREADS": "4"})
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["OMP_NUM_THREADS"] == "4"
    assert env["TORCH_EXTENSIONS_DIR"] and env["PYTHONUNBUFFERED"] == "1"
    if not torch.cuda.is_available():
        assert env["DS_ACCELERATOR"] == "cpu"


# ---------------------------------------------------------------------------------------------------- configs
def test_zero3_config_and_the_70b_offload_config_the_job_runs_with(tmp_path, monkeypatch):
    cfg = zero3_config()
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_param_persistence_threshold"] == 0  # tiny test models are really partitioned
    assert "fp16" not in cfg and "bf16" not in cfg  # CPU: fp32
    assert "optimizer" not in cfg  # the slices train outside the engine
    assert "offload_param" not in zero
    off = zero3_config(offload=True, bf16=True)["zero_optimization"]
    assert off["offload_param"]["device"] == off["offload_optimizer"]["device"] == "cpu"
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    # the 70B profile as its job gets it: the file launch_edit writes, fitted to a 70B checkpoint as each rank does
    seen = {}
    monkeypatch.setattr(launch, "edit_argv", lambda spec_uri, **kw: seen.update(kw) or [sys.executable, "-c", "1"])
    with pytest.raises(EditJobError, match="wrote no edit_summary.json"):
        launch_edit(_spec(tmp_path), str(tmp_path / "edit_config.json"), str(tmp_path / "edit.log"),
                    ds_profile="gpu-offload")
    llama_70b = {"dtype": "bfloat16", "hidden_size": 8192, "intermediate_size": 28672, "vocab_size": 128256}
    big = fit_to_checkpoint(json.loads(Path(seen["ds_config_uri"]).read_text()), llama_70b)
    check_ds_config(big)
    zero = DeepSpeedZeroConfig(**big["zero_optimization"])  # DeepSpeed's own reading of it
    assert big["bf16"]["enabled"] and zero.stage == 3 and zero.gather_16bit_weights_on_model_save
    assert zero.offload_param.device == zero.offload_optimizer.device == "cpu" and zero.offload_param.pin_memory
    assert zero.param_persistence_threshold == 10 * 8192 and zero.max_live_parameters == 1_000_000_000
    for doc in (cfg, ds_config_for("cpu")):  # DeepSpeed's own validation of the zero section (unknown keys fail)
        assert DeepSpeedZeroConfig(**doc["zero_optimization"]).stage == 3
    hosts = (INFRA / "hostfile.example").read_text().splitlines()
    assert any(line.split() == ["worker-0", "slots=8"] for line in hosts)


def test_ds_profiles_are_validated_and_the_offload_profile_is_the_shipped_file(tmp_path, monkeypatch):
    shipped = json.loads((INFRA / "zero3_70b_offload.json").read_text())
    assert ds_config_for("gpu-offload") == shipped
    assert ds_config_for("cpu") == json.loads((INFRA / "zero3_cpu_gloo.json").read_text())
    gpu = ds_config_for("gpu")
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["stage"] == 3
    assert "offload_param" not in gpu["zero_optimization"]
    with pytest.raises(InputError, match=r"ds_profile='gpu_offload'.*auto, cpu, gpu, gpu-offload"):
        ds_config_for("gpu_offload")
    # what the service hands the job is the profile's config: the file launch_edit writes beside the spec
    seen = {}
    monkeypatch.setattr(launch, "edit_argv", lambda spec_uri, **kw: seen.update(kw) or [sys.executable, "-c", "1"])
    with pytest.raises(EditJobError, match="wrote no edit_summary.json"):
        launch_edit(_spec(tmp_path), str(tmp_path / "b" / "edit_config.json"), str(tmp_path / "edit.log"),
                    ds_profile="gpu-offload")
    assert json.loads(Path(seen["ds_config_uri"]).read_text()) == shipped
    # a bad profile or config is bad input (not retried), found before anything is written or launched
    with pytest.raises(InputError, match="ds_profile='gpux'"):
        launch_edit(_spec(tmp_path), str(tmp_path / "c" / "s.json"), str(tmp_path / "c.log"), ds_profile="gpux")
    bad = {**shipped, "zero_optimization": {**shipped["zero_optimization"], "stgae": 3}}
    with pytest.raises(InputError, match="stgae"):
        launch_edit(_spec(tmp_path), str(tmp_path / "c" / "s.json"), str(tmp_path / "c.log"), ds_config=bad)
    with pytest.raises(InputError, match=r"\['bf_16'\].*did you mean 'bf16'"):
        check_ds_config({**shipped, "bf_16": {"enabled": True}})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("edit", "kwargs", "message"), [
    ({"rmisu": {"stpes": 3}}, {}, r"EditConfig.rmisu.stpes is not a field \(did you mean 'steps'\?\)"),
    ({"prnue": True}, {}, r"EditConfig.prnue is not a field \(did you mean 'prune'\?\)"),
    ({"rmisu": {"steps": 0}}, {}, r"EditConfig.rmisu.steps=0"),
    ({"rmisu": ["steps", 3]}, {}, r"EditConfig.rmisu=\['steps', 3\]"),
    ({}, {"ranks": 8}, r"edit.rmisu.batch_size=6 is below the edit job's 8 ranks.*batch_size >= 8.*ranks <= 6"),
    ({"rmisu": {"batch_size": 4}}, {"ranks": 2, "hostfile": "HOSTS"},
     r"batch_size=4 is below the edit job's 16 ranks"),
    ({}, {"launcher": "inprocess", "ds_profile": "gpu-offload"}, r"ds_profile='gpu-offload' needs a DeepSpeed job"),
    ({}, {"ds_profile": "gpu", "cuda": False}, r"ds_profile='gpu' needs GPUs.*ds_profile='cpu'"),
    ({}, {"ds_profile": "cpu_"}, r"ds_profile='cpu_' is not a DeepSpeed profile; choose one of auto, cpu"),
])
def test_validate_edit_plan_names_the_field_and_the_fix(tmp_path, edit, kwargs, message):
    if kwargs.get("hostfile"):
        (tmp_path / "hosts").write_text((INFRA / "hostfile.example").read_text())  # 2 nodes x 8 slots
        kwargs = {**kwargs, "hostfile": str(tmp_path / "hosts")}
        kwargs["ranks"] = 8
    with pytest.raises(InputError, match=message):
        validate_edit_plan("mip", edit, **kwargs)


def test_validate_edit_plan_resolves_a_good_plan():
    plan = validate_edit_plan("mip", {"rmisu": {"batch_size": 8, "steps": 10}}, ranks=8, ds_profile="gpu-offload",
                              cuda=True)
    assert plan.world_size == 8 and plan.ds_profile == "gpu-offload" and plan.rmisu_batch_size == 8
    assert plan.ds_config == ds_config_for("gpu-offload")
    cpu = validate_edit_plan("mip_paper", {}, ranks=2, ds_profile="auto", cuda=False)
    assert cpu.ds_profile == "cpu" and cpu.ds_config == ds_config_for("cpu")
    one = validate_edit_plan("mip", {}, launcher="inprocess", ranks=2)
    assert one.world_size == 1 and one.ds_config is None


# ------------------------------------------------------------------------------------------------ EditSpec
def test_edit_spec_json_round_trip(tmp_path):
    spec = _spec(tmp_path)
    assert spec.forget == (("p0000-name-mm-qa", "req-1"), ("p0000-hobby-text-qa", "req-1"))
    assert EditSpec.from_json(spec.to_json()) == spec
    doc = json.loads(spec.to_json())
    assert doc["forget"][0] == ["p0000-name-mm-qa", "req-1"] and doc["schema"] == "mip-edit-spec/2"
    write_spec(spec, str(tmp_path / "deep" / "edit_config.json"))
    assert read_spec(str(tmp_path / "deep" / "edit_config.json")) == spec
    assert not list((tmp_path / "deep").glob("*.tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize(("changes", "field"), [
    ({"forget": []}, "EditSpec.forget"),
    ({"forget": [["only-an-id"]]}, "EditSpec.forget"),
    ({"forget": [["a", 3]]}, "EditSpec.forget"),
    ({"method": "magic"}, "EditSpec.method"),
    ({"zero_stage": 4}, "EditSpec.zero_stage"),
    ({"output_uri": ""}, "EditSpec.output_uri"),
    ({"retain_item_ids": "p0001"}, "EditSpec.retain_item_ids"),
    ({"edit": ["steps", 3]}, "EditSpec.edit"),
    ({"seed": "0"}, "EditSpec.seed"),
])
def test_edit_spec_validation_names_the_field(tmp_path, changes, field):
    with pytest.raises(InputError, match=field):
        _spec(tmp_path, **changes)


def test_edit_spec_json_errors(tmp_path):
    doc = json.loads(_spec(tmp_path).to_json())
    with pytest.raises(InputError, match=r"EditSpec.stpes is not a field"):
        EditSpec.from_json(json.dumps({**doc, "stpes": 3}))
    old = {k: v for k, v in doc.items() if k != "edit"} | {"schema": "mip-edit-spec/1", "path_edit": doc["edit"]}
    assert EditSpec.from_json(json.dumps(old)) == _spec(tmp_path)  # a job launched before the rename
    del doc["graph_uri"]
    with pytest.raises(InputError, match=r"EditSpec.graph_uri is missing"):
        EditSpec.from_json(json.dumps(doc))
    with pytest.raises(InputError, match="not valid JSON"):
        EditSpec.from_json("{")
    with pytest.raises(InputError, match="does not exist"):
        read_spec(str(tmp_path / "nope.json"))


# ------------------------------------------------------------------------------------------------ failures
def test_inprocess_job_on_a_missing_model_raises_with_the_log_tail(tmp_path):
    spec = _spec(tmp_path)
    log = tmp_path / "logs" / "edit.log"
    with pytest.raises(EditJobError) as info:
        launch_edit(spec, str(tmp_path / "edit_config.json"), str(log), launcher="inprocess")
    assert isinstance(info.value, MipError)
    message = str(info.value)
    assert "ModelLoadError" in message and str(tmp_path / "model") in message and str(log) in message
    assert "model folder" in log.read_text()  # the log holds the error too
    assert read_spec(str(tmp_path / "edit_config.json")) == spec  # the spec was written before the run


def test_failed_subprocess_job_raises_with_exit_code_argv_and_last_lines(tmp_path, monkeypatch):
    script = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit(3)\n"
    seen = {}

    def fake_argv(spec_uri, **kwargs):
        seen.update(kwargs, spec_uri=spec_uri)
        return [sys.executable, "-c", script]

    monkeypatch.setattr(launch, "edit_argv", fake_argv)
    log = tmp_path / "edit.log"
    with pytest.raises(EditJobError) as info:
        launch_edit(_spec(tmp_path), str(tmp_path / "b" / "edit_config.json"), str(log), n_ranks=2)
    message = str(info.value)
    assert "exited with code 3" in message and repr(sys.executable) in message
    assert "line 99" in message and "line 60" in message and "line 59\n" not in message  # the last 40 lines
    assert sum(line.startswith("line ") for line in log.read_text().splitlines()) == 100
    assert seen["n_ranks"] == 2 and seen["launcher"] == "deepspeed"
    ds_config = json.loads((tmp_path / "b" / "ds_config.json").read_text())  # written beside the spec
    assert seen["ds_config_uri"] == str(tmp_path / "b" / "ds_config.json") and ds_config == ds_config_for("cpu")


def test_job_past_its_timeout_is_stopped_and_reported(tmp_path, monkeypatch):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(launch, "edit_argv", lambda *a, **k: sleeper)
    with pytest.raises(EditJobError, match="timed out after 1 s"):
        launch_edit(_spec(tmp_path), str(tmp_path / "s.json"), str(tmp_path / "edit.log"), timeout_s=1)


def test_successful_job_without_a_summary_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "edit_argv", lambda *a, **k: [sys.executable, "-c", "print('ok')"])
    with pytest.raises(EditJobError, match="wrote no edit_summary.json"):
        launch_edit(_spec(tmp_path), str(tmp_path / "s.json"), str(tmp_path / "edit.log"))


# --------------------------------------------------------------------------------------------- one process
def test_distributed_helpers_are_no_ops_on_one_process():
    assert world() == (0, 1)
    assert rank_slice([5, 6, 7]) == [5, 6, 7]
    assert global_share(17) == 1.0
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    q = nn.Parameter(torch.ones(2))
    average_gradients([p, q])
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and q.grad is None
    lin = nn.Linear(2, 2)
    ctx = gather_params([lin.weight, lin.bias, None], modifier_rank=0)
    assert isinstance(ctx, nullcontext)  # unpartitioned: nothing gathered, DeepSpeed not needed


def test_the_job_config_follows_the_checkpoint_dtype_and_size():
    """A bf16 checkpoint is partitioned in bf16 (ZeRO-3 would make every share fp32 otherwise), live parameters
    are a few of its largest matrices, and what a profile sets explicitly is kept."""
    from mip_core.entrypoints.edit import fit_to_checkpoint, zero3_config

    model = {"dtype": "bfloat16", "text_config": {"hidden_size": 64, "intermediate_size": 256, "vocab_size": 100}}
    fitted = fit_to_checkpoint(zero3_config(), model)
    assert fitted["bf16"] == {"enabled": True}
    zero = fitted["zero_optimization"]
    assert (zero["stage3_max_live_parameters"], zero["stage3_prefetch_bucket_size"]) == (3 * 64 * 256, 64 * 256)
    assert "bf16" not in fit_to_checkpoint(zero3_config(), {"text_config": {"hidden_size": 8}})  # float32 stays
    offload = fit_to_checkpoint(ds_config_for("gpu-offload"), model)
    assert offload["zero_optimization"]["stage3_max_live_parameters"] == 1_000_000_000  # the profile's own value
    assert "bf16" not in zero3_config()  # the input is not changed
