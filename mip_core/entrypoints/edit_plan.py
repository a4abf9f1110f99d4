"""The edit job's DeepSpeed profiles and the checks a batch's edit settings must pass before anything runs.

A typo in an edit override, an RMisU batch smaller than the job's ranks or a GPU profile on a CPU-only machine
used to surface inside the job, minutes later, after every rank had loaded the model. :func:`validate_edit_plan`
finds them at planning time and names the field and the fix; :func:`ds_config_for` builds (and validates with
DeepSpeed's own config classes) the config the job gets.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mip_core.entrypoints.edit import zero3_config
from mip_core.errors import InputError

Profile = Literal["auto", "cpu", "gpu", "gpu-offload"]
PROFILES: tuple[str, ...] = ("auto", "cpu", "gpu", "gpu-offload")
LAUNCHERS: tuple[str, ...] = ("deepspeed", "torchrun", "inprocess")
HIDDEN_70B = 8192  # the offload profile's buckets are sized for this hidden size (Llama-3-70B-class LLMs)
# Top-level config sections the edit job may use; DeepSpeed itself ignores unknown top-level keys silently.
_TOP_LEVEL = frozenset({"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                        "zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown",
                        "optimizer", "gradient_clipping", "aio", "communication_data_type",
                        "zero_allow_untested_optimizer"})


class EditPlan(BaseModel):
    """How the edit job will run, resolved at planning time (what :func:`validate_edit_plan` returns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    launcher: Literal["deepspeed", "torchrun", "inprocess"]
    ranks: int = Field(ge=0)
    world_size: int = Field(ge=1, description="ranks over every node (hostfile slots), 1 in-process")
    ds_profile: Literal["cpu", "gpu", "gpu-offload"] | None = Field(description="None in-process")
    rmisu_batch_size: int | None = None
    ds_config: dict[str, Any] | None = None


class _ProfileChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ds_profile: Profile


def resolve_profile(profile: str, *, cuda: bool | None = None) -> str:
    """``profile`` checked (pydantic) and ``auto`` resolved from this machine: ``gpu`` with CUDA, else ``cpu``."""
    try:
        _ProfileChoice(ds_profile=profile)  # type: ignore[arg-type]
    except ValidationError:
        raise InputError(f"ds_profile={profile!r} is not a DeepSpeed profile; choose one of "
                         f"{', '.join(PROFILES)}") from None
    if profile != "auto":
        return profile
    return "gpu" if (_has_cuda() if cuda is None else cuda) else "cpu"


def ds_config_for(profile: str, *, zero_stage: int = 3) -> dict[str, Any]:
    """The DeepSpeed config of ``profile``, validated by DeepSpeed before any launch.

    - ``cpu``: gloo, fp32, every parameter partitioned, no prefetch (infra/deepspeed/zero3_cpu_gloo.json);
    - ``gpu``: one GPU node, bf16, ZeRO-3, small tensors kept whole (DeepSpeed's default threshold);
    - ``gpu-offload``: ZeRO-3 bf16 with parameters offloaded to pinned CPU memory, buckets for hidden 8192
      (a 70B-class model on one 8-GPU node; infra/deepspeed/zero3_70b_offload.json is this config).
    """
    profile = resolve_profile(profile)
    if profile == "cpu":
        config = zero3_config(zero_stage=zero_stage)
        # CPU ranks share the cores between compute and gloo: prefetching or keeping gathered layers buys no
        # overlap, only memory, so each layer is gathered when used and released at once
        config["zero_optimization"].update({"stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0,
                                            "stage3_max_reuse_distance": 0})
    elif profile == "gpu":
        config = zero3_config(zero_stage=zero_stage, bf16=True, param_persistence_threshold=100_000)
    else:
        config = _offload_config(zero_stage)
    check_ds_config(config)
    return config


def _offload_config(zero_stage: int) -> dict[str, Any]:
    config = zero3_config(zero_stage=zero_stage, bf16=True, offload=True,
                          param_persistence_threshold=10 * HIDDEN_70B)
    config["zero_optimization"].update({
        "overlap_comm": True, "sub_group_size": 1_000_000_000, "reduce_bucket_size": HIDDEN_70B ** 2,
        "stage3_prefetch_bucket_size": int(0.9 * HIDDEN_70B ** 2), "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000})
    return config


def check_ds_config(config: dict[str, Any]) -> None:
    """DeepSpeed's own validation (no process group needed), plus unknown top-level keys, as InputError."""
    unknown = sorted(set(config) - _TOP_LEVEL)
    if unknown:
        raise InputError(f"DeepSpeed config has unknown section(s) {unknown}{_close(unknown[0], _TOP_LEVEL)}; "
                         f"the edit job uses {sorted(_TOP_LEVEL)}")
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(dict(config))
    except (ValidationError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"DeepSpeed config is invalid: {err}".splitlines()[0] + f" ({_first_error(err)})"
                         ) from err


def validate_edit_plan(method: str, edit: dict[str, Any] | None, *, launcher: str = "deepspeed", ranks: int = 2,
                       hostfile: str | None = None, ds_profile: str = "auto", cuda: bool | None = None
                       ) -> EditPlan:
    """Check a batch's edit settings at planning time; every problem is an InputError naming field and fix.

    Checks: ``method`` exists; ``edit`` is a valid :class:`EditConfig` override, nested ``rmisu`` included (the
    config's own validation: typos get a suggestion, values in range); the RMisU batch is at least the job's world
    size (every rank needs a share of each batch); the profile exists, is used by the launcher, and has a GPU where
    needed.
    """
    from mip_core.editing.methods import METHODS, EditConfig, get_method

    if method not in METHODS:
        raise InputError(f"method={method!r} is unknown; choose from {', '.join(METHODS)}")
    if launcher not in LAUNCHERS:
        raise InputError(f"launcher={launcher!r} is unknown; use one of {', '.join(LAUNCHERS)}")
    edit = dict(edit or {})
    built = get_method(method, edit_overrides=edit)
    config = built.config if isinstance(getattr(built, "config", None), EditConfig) else None
    if config is None and edit:
        raise InputError(f"edit={edit} but method {method!r} takes no EditConfig overrides; remove 'edit' "
                         f"or use a path method")
    batch = config.rmisu.batch_size if config is not None else None
    inprocess = launcher == "inprocess" or ranks == 0
    world = 1 if inprocess else _world_size(ranks, hostfile)
    profile = resolve_profile(ds_profile, cuda=cuda)
    if inprocess:
        if ds_profile not in ("auto", "cpu"):
            raise InputError(f"ds_profile={ds_profile!r} needs a DeepSpeed job but launcher={launcher!r} runs the "
                             f"edit in this process without DeepSpeed; set launcher='deepspeed' or ds_profile='auto'")
        return EditPlan(method=method, launcher="inprocess", ranks=0, world_size=1, ds_profile=None,
                        rmisu_batch_size=batch)
    if batch is not None and batch < world:
        raise InputError(f"edit.rmisu.batch_size={batch} is below the edit job's {world} ranks (each rank takes a "
                         f"share of every batch); set edit.rmisu.batch_size >= {world} "
                         f"(e.g. {{\"rmisu\": {{\"batch_size\": {world}}}}}) or ranks <= {batch}")
    _check_devices(profile, ranks, hostfile, cuda)
    return EditPlan(method=method, launcher=launcher, ranks=ranks, world_size=world,  # type: ignore[arg-type]
                    ds_profile=profile, rmisu_batch_size=batch,  # type: ignore[arg-type]
                    ds_config=ds_config_for(profile))


def _world_size(ranks: int, hostfile: str | None) -> int:
    """Ranks per node times nodes: a hostfile's slots (capped by ``--num_gpus``) summed over its nodes."""
    if ranks < 1:
        raise InputError(f"ranks={ranks}: a launched edit job needs at least one rank (or launcher='inprocess')")
    if not hostfile:
        return ranks
    from mip_core.storage import filesystem

    fs, path = filesystem(hostfile)
    if not fs.exists(path):
        raise InputError(f"hostfile={hostfile!r} does not exist; see infra/deepspeed/hostfile.example")
    with fs.open(path, "r") as f:
        slots = [int(word.split("=", 1)[1]) for line in f if line.split("#", 1)[0].strip()
                 for word in line.split()[1:] if word.startswith("slots=")]
    if not slots:
        raise InputError(f"hostfile={hostfile!r} names no 'host slots=N' lines; see infra/deepspeed/hostfile.example")
    return sum(min(s, ranks) for s in slots)


def _check_devices(profile: str, ranks: int, hostfile: str | None, cuda: bool | None) -> None:
    """A GPU profile run on this machine (no hostfile) needs CUDA and a GPU per rank."""
    if profile == "cpu" or hostfile:
        return
    if not (_has_cuda() if cuda is None else cuda):
        raise InputError(f"ds_profile={profile!r} needs GPUs but this machine has no CUDA device; use "
                         f"ds_profile='cpu' (or 'auto'), or give a hostfile of GPU nodes")
    if cuda is None:
        import torch

        if ranks > torch.cuda.device_count():
            raise InputError(f"ranks={ranks} but this machine has {torch.cuda.device_count()} GPU(s); set ranks <= "
                             f"{torch.cuda.device_count()} or give a hostfile")


def _close(word: str, choices: Any) -> str:
    match = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        e = err.errors()[0]
        return f"{err.title}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
    return str(err)[:200]


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


__all__ = ["PROFILES", "EditPlan", "check_ds_config", "ds_config_for", "resolve_profile", "validate_edit_plan"]
