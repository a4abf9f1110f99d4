"""Memory, bytes moved and wall time per stage at scale: attribution, the edit and publication (issue 17).

Random-weight Qwen2.5-VL models with the real architecture's shape scaled down to about 0.1 B, 0.5 B and 1.5 B
parameters (Qwen's width ratios, fewer layers; bf16, sharded safetensors, a tiny tokenizer and image processor
as the project's tiny models use) go through the service's own stages, each in its own process tree:

- ``register``: the base model into a fresh local store (``ServiceStore.register_model``), as ``v0001``;
- ``attribute``: one Ray actor (``tasks.actors.attribute_batch``) on a few text forget items of a synthetic
  benchmark (``mip benchmark make``), then the reduced path graph;
- ``edit``: the DeepSpeed edit job over gloo (``tasks.launch.launch_edit``), 1 rank and 2 ranks, a few RMisU
  steps on the path neurons;
- ``publish``: the edited model as a new version of the store.

Every process of a stage's tree is polled (psutil, every 0.2 s): peak RSS (``VmHWM`` of /proc/<pid>/status,
and the peak of its anonymous part ``RssAnon``), bytes through read/write syscalls (``rchar``/``wchar`` of
/proc/<pid>/io: files read with read(), sockets, pipes; *not* memory-mapped reads such as safetensors loads)
and bytes the process made the block layer fetch or dirtied (``read_bytes``/``write_bytes``; page-cache hits
read nothing). The "fixed runtime" of an empty Ray actor and of an empty DeepSpeed rank (imports done, process
group up, no model) is measured the same way. Rows go to ``benches/results/scale.json`` (written after every
stage, so a crash keeps what was measured) under ``"measured"``/``"rows"``; an extrapolation to Qwen2.5-VL-72B
on 8 x 80 GB nodes, computed from the measured constants and printed with its formula, goes under
``"extrapolated"``.

    python benches/scale_bench.py                      # all sizes (about 30-40 min on 2 cores)
    python benches/scale_bench.py --sizes smoke        # a 3 M-parameter run of the same code, about 5 min
    python benches/scale_bench.py --extrapolate-only   # recompute the extrapolation from scale.json

A memory guard stops a stage whose process tree holds more than ``--mem-limit-gib`` of anonymous memory at
once (default 10 GiB: the machine is shared); such a row says ``"aborted"`` with the figures seen until then.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3

# ------------------------------------------------------------------------------------------------ shapes
#: The scaled models. ``hidden`` and ``layers`` pick the size; every other width follows Qwen2.5-VL-7B's
#: ratios (MLP 18944/3584 of the hidden size, 128-wide heads, 7 query heads per KV head; vision MLP 3456/1280
#: of the vision width, vision width 1280/3584 of the hidden size). ``1.5b`` has the 7B's real layer widths.
SIZES: dict[str, dict[str, int]] = {
    "smoke": {"hidden": 256, "layers": 2, "vision_depth": 2},
    "0.1b": {"hidden": 1024, "layers": 5, "vision_depth": 4},
    "0.5b": {"hidden": 2048, "layers": 6, "vision_depth": 4},
    "1.5b": {"hidden": 3584, "layers": 6, "vision_depth": 4},
}
#: Less work at the larger sizes: on a CPU without bf16 instructions (AVX2 only, as here) a bf16 matmul runs
#: at 3-8 GFLOP/s forward and about 0.2 GFLOP/s for the input gradient (float32: 22 and 8), and the
#: checkpoints load in their stored bf16. Memory does not depend on these counts (one pass's activations are
#: small at these sequence lengths); wall time does. Overridden by --items / --edit-steps / --edit-batch. The
#: RMisU batch stays 2: the ranks of a job share each batch, so it must be at least the world size.
SIZE_WORK: dict[str, dict[str, int]] = {
    "0.5b": {"items": 2, "edit_steps": 1},
    "1.5b": {"items": 1, "edit_steps": 1},
}
#: Shards per decoder layer of the saved checkpoints: Qwen2.5-VL-72B ships 38 shards for 80 layers (about 2
#: layers per shard), so a shard holds about two decoder layers here as well.
LAYERS_PER_SHARD = 2


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def scaled_dims(hidden: int, layers: int, vision_depth: int) -> dict[str, int]:
    """Qwen2.5-VL-7B's width ratios at ``hidden``: MLP 18944/3584 of it, vision width 1280/3584 of it (capped
    at the published 1280), vision MLP 3456/1280 of the vision width."""
    vision = 1280 if hidden >= 3584 else _round(hidden * 1280 / 3584, 64)
    return {"hidden": hidden, "intermediate": 18944 if hidden == 3584 else _round(hidden * 18944 / 3584, 128),
            "layers": layers, "vision_depth": vision_depth, "vision_hidden": vision,
            "vision_intermediate": 3456 if vision == 1280 else _round(vision * 3456 / 1280, 64)}


def build_config(name: str, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """The Qwen2.5-VL config of size ``name`` with the tiny tokenizer's vocabulary, and its dimensions.

    Built by ``mip_core.modeling.shapes.scaled_config`` (the published checkpoints' layout: 128-wide heads,
    one KV head per about 7 query heads, 14-pixel patches merged 2x2, window attention, bf16).
    """
    from mip_core.modeling.shapes import scaled_config

    d = scaled_dims(**SIZES[name])
    config = scaled_config("qwen2_5_vl", d["hidden"], d["intermediate"], d["layers"], d["vision_depth"],
                           len(tokenizer), tokenizer=tokenizer, vision_hidden=d["vision_hidden"],
                           vision_intermediate=d["vision_intermediate"])
    text = config.text_config
    return config, {**d, "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
                    "vision_heads": config.vision_config.num_heads, "vocab": len(tokenizer),
                    "built_by": "mip_core.modeling.shapes.scaled_config"}


def count_mlp_neurons(config: Any) -> dict[str, int]:
    text = getattr(config, "text_config", config)
    vision = config.vision_config
    return {"language": int(text.num_hidden_layers) * int(text.intermediate_size),
            "vision": int(vision.depth) * int(vision.intermediate_size)}


# ------------------------------------------------------------------------------------------- monitoring
def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _proc_io(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
                out[key] = int(value)
    return out


def self_memory() -> dict[str, int]:
    """This process's VmHWM / VmRSS / RssAnon in bytes (what the baseline processes report)."""
    return _proc_status(os.getpid())


class TreeMonitor(threading.Thread):
    """Polls a process and all its descendants: peak RSS, peak anonymous RSS, I/O counters, command line."""

    def __init__(self, root_pid: int, interval: float = 0.2, mem_limit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.mem_limit = root_pid, interval, mem_limit
        self.procs: dict[int, dict[str, Any]] = {}
        self.peak_tree_anon = 0
        self.aborted: str | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                root = psutil.Process(self.root_pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total_anon = 0
            for p in tree:
                try:
                    st, io = _proc_status(p.pid), _proc_io(p.pid)
                    cmd = p.cmdline()
                except (OSError, psutil.Error):
                    continue
                rec = self.procs.setdefault(p.pid, {"pid": p.pid, "ppid": p.ppid(), "first_seen": time.time(),
                                                    "hwm": 0, "anon_peak": 0, "file_peak": 0, "io": {}})
                rec["cmd"] = cmd
                rec["last_seen"] = time.time()
                rec["hwm"] = max(rec["hwm"], st.get("VmHWM", 0))
                rec["anon_peak"] = max(rec["anon_peak"], st.get("RssAnon", 0))
                rec["file_peak"] = max(rec["file_peak"], st.get("RssFile", 0))
                rec["io"] = io
                total_anon += st.get("RssAnon", 0)
            self.peak_tree_anon = max(self.peak_tree_anon, total_anon)
            if self.mem_limit and total_anon > self.mem_limit and not self.aborted:
                self.aborted = (f"memory guard: the stage's processes held {total_anon / GiB:.1f} GiB of "
                                f"anonymous memory at once (limit {self.mem_limit / GiB:.1f} GiB)")
                for p in reversed(tree):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            self._halt.wait(self.interval)


def run_stage(argv: list[str], env: dict[str, str], timeout_s: float, mem_limit: int | None,
              log_path: Path) -> dict[str, Any]:
    """Run ``argv`` in a new session under a :class:`TreeMonitor`; returns wall time, exit code, processes."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        mon = TreeMonitor(proc.pid, mem_limit=mem_limit)
        mon.start()
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
            mon.aborted = mon.aborted or f"timed out after {timeout_s:.0f} s"
        finally:
            if code is None or mon.aborted:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # a process group member that outlived its parent (a Ray worker) is ended with the group
            with _suppress():
                os.killpg(proc.pid, signal.SIGTERM)
            mon.stop()
    return {"wall_s": round(time.perf_counter() - t0, 2), "code": proc.returncode, "aborted": mon.aborted,
            "procs": list(mon.procs.values()), "peak_tree_anon": mon.peak_tree_anon}


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError, OSError))


def stage_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    ray_tmp = Path("/tmp") / f"ray-scale-{os.getpid()}"  # Ray's socket paths must stay short
    env.update({"MIP_THREADS": env.get("MIP_THREADS", "1"),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(ray_tmp),
                "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                "MIP_PROGRESS": "off", "PYTHONUNBUFFERED": "1",
                "TORCH_EXTENSIONS_DIR": str(work / "torch-extensions"),
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


# ------------------------------------------------------------------------------------ stage processes
def _stage_build(a: dict[str, Any]) -> dict[str, Any]:
    """Build the random bf16 model of size ``a['size']`` and save it sharded, with its processor."""
    import torch

    from mip_core.adapters import adapter_class
    from mip_core.adapters.base import TinySize
    from mip_core.benchmark import corpus_for_tokenizer
    from mip_core.modeling.tokenizer import train_tokenizer

    torch.set_num_threads(1)
    cls = adapter_class("qwen2_5_vl")
    tokenizer = train_tokenizer(corpus_for_tokenizer(), cls.special_tokens, pad_token=cls.pad_token,
                                eos_token=cls.eos_token, image_token=cls.image_token)
    config, how = build_config(a["size"], tokenizer)
    vision = config.vision_config
    processor = cls.build_processor(tokenizer, TinySize(
        "scaled", hidden=0, mlp=0, layers=0, heads=1, kv_heads=1, vision_depth=0, vision_width=0,
        vision_mlp=0, vision_heads=1, image_size=int(vision.patch_size) * 4, patch=int(vision.patch_size)))
    torch.manual_seed(0)
    model = cls.model_class._from_config(config, dtype=torch.bfloat16)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    text = config.text_config
    layer_bytes = 2 * params / max(1, int(text.num_hidden_layers))
    shard = max(16 * 1024**2, int(LAYERS_PER_SHARD * layer_bytes))
    out = Path(a["out"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard, safe_serialization=True)
    processor.save_pretrained(tmp)
    os.replace(tmp, out)
    return {"params": params, "config": how, "mlp_neurons": count_mlp_neurons(config),
            "max_shard_size": shard, "dtype": "bfloat16"}


def _stage_register(a: dict[str, Any]) -> dict[str, Any]:
    from mip_core.service.store import ServiceStore

    store = ServiceStore(a["root"])
    import mip_core.adapters  # noqa: F401 - imported by the model card's usage section: not the call's bytes

    before = _proc_io(os.getpid())
    version = store.register_model(a["name"], a["source"], dataset_uri=a["bench"])
    return {"version": version, "uri": store.uri(store.model_key(a["name"], version)),
            "io_delta": _io_delta(before)}


def _warm_up(store: Any, source: str) -> None:
    """Register the model's small files once under another name, so that what a registration imports on first
    use (model card, adapters) is not counted as the measured call's bytes."""
    warm = Path(store.uri("incoming/warm-up"))
    warm.mkdir(parents=True, exist_ok=True)
    for f in Path(source).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, warm / f.name)
    store.register_model("warm-up", str(warm), dataset_uri="none")
    shutil.rmtree(warm, ignore_errors=True)


def _io_delta(before: dict[str, int]) -> dict[str, int]:
    after = _proc_io(os.getpid())
    return {k: after[k] - before.get(k, 0) for k in after}


def _baseline_actor_body() -> dict[str, Any]:
    import tasks.actors  # noqa: F401 - what an attribution actor imports, model classes included
    from mip_core.adapters import adapter_class

    adapter_class("qwen2_5_vl").model_class  # noqa: B018
    return {"pid": os.getpid(), **self_memory()}


def _stage_attribute(a: dict[str, Any]) -> dict[str, Any]:
    import ray

    from mip_core.path_graph import reduce_paths
    from mip_core.parquet_io import read_item_paths, write_path_graph
    from tasks.actors import attribute_batch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        empty = ray.remote(num_cpus=0)(_BaselineActor).remote()
        baseline = ray.get(empty.measure.remote())
        ray.kill(empty, no_restart=True)
        time.sleep(1.0)  # the monitor sees the empty actor before it goes
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if a.get("dtype"):
            kwargs["dtype"] = a["dtype"]
        results = attribute_batch(a["model"], a["bench"], [tuple(p) for p in a["items"]], a["out_prefix"],
                                  run_id=a["run_id"], n_actors=1, attribution_cfg=a["cfg"], log=print,
                                  **kwargs)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    graph = reduce_paths(read_item_paths([r.uri for r in results]), run_id=a["run_id"])
    write_path_graph(graph, a["graph"])
    by_tower: dict[str, int] = {}
    for node in graph.nodes:
        by_tower[node.tower] = by_tower.get(node.tower, 0) + 1
    return {"baseline": baseline, "actors": sorted({r.actor for r in results}), "seconds": round(seconds, 2),
            "shard_seconds": round(sum(r.seconds for r in results), 2),
            "n_items": sum(r.n_items for r in results),
            "failures": [f for r in results for f in r.failures], "graph_nodes": len(graph),
            "graph_by_tower": by_tower}


class _BaselineActor:
    def __init__(self) -> None:
        self.figures = _baseline_actor_body()

    def measure(self) -> dict[str, Any]:
        return {**self.figures, **self_memory()}


def _stage_rank_baseline(a: dict[str, Any]) -> dict[str, Any]:
    """Run by every rank of a DeepSpeed job: the edit job's imports, the gloo group up, no model."""
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig  # noqa: F401

    import mip_core.entrypoints.edit  # noqa: F401
    import mip_core.editing.methods  # noqa: F401
    import mip_core.parquet_io  # noqa: F401
    from mip_core.adapters import adapter_class

    adapter_class("qwen2_5_vl").model_class  # noqa: B018
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    dist.barrier()
    time.sleep(1.5)  # the monitor polls every 0.2 s
    out = {"rank": dist.get_rank(), "pid": os.getpid(), **self_memory()}
    dist.barrier()
    dist.destroy_process_group()
    return out


def _stage_edit(a: dict[str, Any]) -> dict[str, Any]:
    from mip_core.entrypoints.edit import EditSpec
    from tasks.launch import launch_edit

    spec = EditSpec(**a["spec"])
    kwargs: dict[str, Any] = {}
    if a.get("ds_profile"):
        kwargs["ds_profile"] = a["ds_profile"]
    t0 = time.perf_counter()
    summary = launch_edit(spec, a["spec_uri"], a["log_uri"], launcher="deepspeed", n_ranks=a["ranks"],
                          timeout_s=a["timeout_s"], **kwargs)
    return {"summary": summary, "seconds": round(time.perf_counter() - t0, 2)}


def _stage_publish(a: dict[str, Any]) -> dict[str, Any]:
    from mip_core.service.store import ServiceStore

    store = ServiceStore(a["root"])
    lineage = {"parent_version": a["parent"], "batch_id": a["batch_id"], "requests": ["scale-bench"]}
    publish = getattr(store, "publish", None)
    _warm_up(store, a["source"])
    before = _proc_io(os.getpid())
    t0 = time.perf_counter()
    if callable(publish):  # the store's publication entry point, where it has one
        try:
            version = publish(a["name"], a["source"], dataset_uri=a["bench"], lineage=lineage)
            how = "ServiceStore.publish"
        except TypeError:
            version = store.register_model(a["name"], a["source"], dataset_uri=a["bench"], lineage=lineage)
            how = "ServiceStore.register_model"
    else:
        version = store.register_model(a["name"], a["source"], dataset_uri=a["bench"], lineage=lineage)
        how = "ServiceStore.register_model"
    return {"version": version, "how": how, "seconds": round(time.perf_counter() - t0, 2),
            "uri": store.uri(store.model_key(a["name"], version)), "io_delta": _io_delta(before)}


STAGES = {"build": _stage_build, "register": _stage_register, "attribute": _stage_attribute,
          "rank_baseline": _stage_rank_baseline, "edit": _stage_edit, "publish": _stage_publish}


def stage_main(argv: list[str]) -> int:
    """``scale_bench.py _stage NAME ARGS.json`` (DeepSpeed adds ``--local_rank=N``): one stage, its JSON."""
    argv = [x for x in argv if not x.startswith("--local_rank")]
    name, args_file = argv[0], argv[1]
    a = json.loads(Path(args_file).read_text())
    out = STAGES[name](a)
    result = Path(a["result"])
    if name == "rank_baseline":
        result = result.with_name(f"{result.stem}-rank{out['rank']}.json")
    result.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


# ------------------------------------------------------------------------------------------- the driver
def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def new_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the files under ``folder`` that have their own inode (written) and that are hard links."""
    own = linked = 0
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            if st.st_nlink > 1:
                linked += st.st_size
            else:
                own += st.st_size
    return {"own_bytes": own, "linked_bytes": linked}


def _role(rec: dict[str, Any], root_pid: int, actor_pids: set[int]) -> str:
    cmd = " ".join(rec.get("cmd") or [])
    if rec["pid"] in actor_pids:
        return "actor"
    if rec["pid"] == root_pid:
        return "driver"
    if any(x.startswith("--local_rank") for x in rec.get("cmd") or []):
        return "rank"
    if "deepspeed" in cmd:
        return "launcher"
    if "ray" in cmd or "raylet" in cmd or "gcs_server" in cmd:
        return "ray"
    return "other"


def summarize_procs(run: dict[str, Any], actor_pids: set[int] = frozenset()) -> list[dict[str, Any]]:
    root = min((p["pid"] for p in run["procs"] if p.get("ppid") not in {q["pid"] for q in run["procs"]}),
               default=-1)
    out = []
    for rec in run["procs"]:
        io = rec.get("io") or {}
        out.append({"pid": rec["pid"], "role": _role(rec, root, actor_pids), "peak_rss_bytes": rec["hwm"],
                    "peak_anon_bytes": rec["anon_peak"], "peak_file_rss_bytes": rec["file_peak"],
                    "rchar": io.get("rchar", 0), "wchar": io.get("wchar", 0),
                    "read_bytes": io.get("read_bytes", 0), "write_bytes": io.get("write_bytes", 0),
                    "cmd": " ".join(rec.get("cmd") or [])[:160]})
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = stage_env(self.work)
        self.out = Path(args.out)
        self.doc: dict[str, Any] = {"schema": "mip-scale-bench/1", "rows": [], "baselines": {}, "models": {}}
        if args.append and self.out.exists():
            self.doc = json.loads(self.out.read_text())
        command = "python benches/scale_bench.py " + " ".join(sys.argv[1:])
        earlier = (self.doc.get("measured") or {}).get("commands", []) if args.append else []
        self.doc["measured"] = {
            "commands": [*earlier, command],  # --append runs add rows (and their command) to the file
            "date": dt.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{_mem_total() / GiB:.0f} GiB RAM, no GPU, Python {platform.python_version()}",
            "threads": self.env["MIP_THREADS"],
            "counters": "peak_rss_bytes: VmHWM of /proc/<pid>/status (largest of the stage's work "
                        "processes); peak_anon_bytes: peak RssAnon; bytes_moved: rchar + wchar of "
                        "/proc/<pid>/io (syscall reads and writes: files, sockets, pipes; not memory-mapped "
                        "reads), the largest of the stage's work processes; storage_bytes: read_bytes + "
                        "write_bytes (block layer; page-cache hits read nothing; kernel-side copies count as "
                        "written)",
        }
        self.n = 0

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")

    def stage(self, name: str, args: dict[str, Any], *, tag: str, launcher: list[str] | None = None,
              timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        self.n += 1
        stem = self.work / "stages" / f"{self.n:02d}-{tag}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        args = {**args, "result": str(stem) + ".result.json"}
        Path(str(stem) + ".args.json").write_text(json.dumps(args, indent=1))
        argv = [*(launcher or [sys.executable]), str(Path(__file__).resolve()), "_stage", name,
                str(stem) + ".args.json"]
        print(f"[{time.strftime('%H:%M:%S')}] {tag}: {name} ...", flush=True)
        run = run_stage(argv, self.env, timeout_s or self.args.stage_timeout_s,
                        int(self.args.mem_limit_gib * GiB), Path(str(stem) + ".log"))
        result_path = Path(args["result"])
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        if result is None and name == "rank_baseline":
            parts = sorted(result_path.parent.glob(result_path.stem + "-rank*.json"))
            result = {"ranks": [json.loads(p.read_text()) for p in parts]} if parts else None
        status = "ok" if run["code"] == 0 and result is not None and not run["aborted"] else "failed"
        print(f"[{time.strftime('%H:%M:%S')}] {tag}: {status} in {run['wall_s']} s"
              + (f" ({run['aborted']})" if run["aborted"] else "")
              + ("" if status == "ok" else f"; log: {stem}.log"), flush=True)
        run["status"], run["log"] = status, str(stem) + ".log"
        if status != "ok":
            run["log_tail"] = _tail(Path(str(stem) + ".log"))
        return run, result

    # ------------------------------------------------------------------ baselines
    def baselines(self) -> None:
        if self.doc["baselines"].get("rank") and not self.args.remeasure_baselines:
            return
        port = _free_port()
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port)]
        run, result = self.stage("rank_baseline", {}, tag="baseline-rank", launcher=launcher, timeout_s=600)
        ranks = [p for p in summarize_procs(run) if p["role"] == "rank"]
        self.doc["baselines"]["rank"] = {
            "what": "an empty DeepSpeed rank: the edit job's imports (torch, transformers, deepspeed, the "
                    "model classes, the editing code), the gloo process group up, no model; 2 ranks",
            "peak_rss_bytes": max((p["peak_rss_bytes"] for p in ranks), default=None),
            "peak_anon_bytes": max((p["peak_anon_bytes"] for p in ranks), default=None),
            "bytes_moved": max((p["rchar"] + p["wchar"] for p in ranks), default=None),
            "self_reported": (result or {}).get("ranks"), "status": run["status"]}
        self.save()

    # ------------------------------------------------------------------ one model size
    def bench_data(self) -> Path:
        bench = self.work / "bench"
        if not (bench / "manifest.json").exists():
            mip = str(Path(sys.executable).parent / "mip")
            subprocess.run([mip, "benchmark", "make", "--out", str(bench), "--profiles",
                            str(self.args.profiles), "--seed", "0"], check=True, env=self.env,
                           stdout=subprocess.DEVNULL)
        return bench

    def model(self, size: str) -> tuple[Path, dict[str, Any]]:
        folder = self.work / "models" / size
        info_file = folder.parent / f"{size}.json"  # not with_suffix: "0.1b" has a "suffix"
        if not (folder.is_dir() and info_file.exists()):
            shutil.rmtree(folder, ignore_errors=True)
            run, result = self.stage("build", {"size": size, "out": str(folder)}, tag=f"{size}-build",
                                     timeout_s=1800)
            if result is None:
                raise RuntimeError(f"building the {size} model failed; see {run['log']}:\n"
                                   f"{run.get('log_tail')}")
            info_file.write_text(json.dumps(result, indent=1))
        info = json.loads(info_file.read_text())
        info["model_bytes"] = folder_bytes(folder)
        info["n_shards"] = len(list(folder.glob("*.safetensors")))
        self.doc["models"][size] = info
        return folder, info

    def work_for(self, size: str) -> dict[str, int]:
        a = self.args
        work = {"items": 4, "edit_steps": 2, "edit_batch": 2, **SIZE_WORK.get(size, {})}
        for key in work:
            if getattr(a, key) is not None:
                work[key] = getattr(a, key)
        return work

    def items(self, bench: Path, n_items: int) -> tuple[list[list[str]], list[str]]:
        from mip_core.benchmark import load_benchmark

        b = load_benchmark(str(bench))
        text = [it for it in b.items if it.kind == "qa" and it.modality == "text"]
        forget = [[it.item_id, f"req-{it.profile_id}"] for it in text if it.profile_id == "p0000"]
        forget = forget[:n_items]
        retain = [it.item_id for it in text if it.profile_id not in ("p0000",)][: self.args.retain]
        return forget, retain

    def row(self, size: str, info: dict[str, Any], stage: str, world_size: int, run: dict[str, Any],
            work_roles: tuple[str, ...], baseline: int | None, actor_pids: set[int] = frozenset(),
            **extra: Any) -> dict[str, Any]:
        procs = summarize_procs(run, actor_pids)
        work = [p for p in procs if p["role"] in work_roles]
        peak = max((p["peak_rss_bytes"] for p in work), default=None)
        row = {
            "model": size, "params": info["params"], "stage": stage, "world_size": world_size,
            "status": run["status"] if not run["aborted"] else "aborted: " + run["aborted"],
            "peak_rss_bytes": peak,
            "peak_anon_bytes": max((p["peak_anon_bytes"] for p in work), default=None),
            "baseline_rss_bytes": baseline,
            "peak_beyond_baseline_bytes": (peak - baseline) if peak is not None and baseline else None,
            "model_bytes": info["model_bytes"],
            "float32_model_bytes": 4 * info["params"],
            "bytes_moved": max((p["rchar"] + p["wchar"] for p in work), default=None),
            "storage_bytes": max((p["read_bytes"] + p["write_bytes"] for p in work), default=None),
            "wall_s": run["wall_s"],
            "work_processes": [{k: v for k, v in p.items() if k != "cmd"} | {"cmd": p["cmd"][:100]}
                               for p in work],
            "peak_tree_anon_bytes": run["peak_tree_anon"],
            **extra,
        }
        reconcile(row)
        if row["status"] != "ok":
            row["log"] = run["log"]
            row["log_tail"] = run.get("log_tail", "")[-2000:]
        key = (size, stage, world_size)
        self.doc["rows"] = [r for r in self.doc["rows"] if (r["model"], r["stage"], r["world_size"]) != key]
        self.doc["rows"].append(row)
        self.save()
        _print_row(row)
        return row

    def size(self, size: str) -> None:
        a = self.args
        bench = self.bench_data()
        folder, info = self.model(size)
        neurons = info["mlp_neurons"]
        total_neurons = neurons["language"] + neurons["vision"]
        work = self.work_for(size)
        forget, retain = self.items(bench, work["items"])
        sw = self.work / "runs" / size
        shutil.rmtree(sw, ignore_errors=True)
        root = sw / "store"
        base = self.doc["baselines"]

        run, reg = self.stage("register", {"root": str(root), "name": "scale", "source": str(folder),
                                           "bench": str(bench)}, tag=f"{size}-register")
        stages = set(a.stages.split(","))
        if "register" in stages:
            self.row(size, info, "register", 1, run, ("driver",), None,
                     call_io=(reg or {}).get("io_delta"),
                     call_bytes_moved=_moved((reg or {}).get("io_delta")),
                     store_new=new_bytes(root / "models") if root.exists() else None)
        if reg is None:
            return
        model_uri = reg["uri"]

        cfg = {"steps": a.attr_steps, "top_k": a.top_k, "batch_items": work["items"], "towers": ["language"]}
        graph_uri = str(sw / "path_graph")
        measured = "attribute" in stages  # else only the path graph the edit needs, in float32 (faster here)
        run, att = self.stage("attribute", {"model": model_uri, "bench": str(bench), "items": forget,
                                            "out_prefix": str(sw / "shards"), "run_id": f"scale-{size}",
                                            "cfg": cfg, "graph": graph_uri,
                                            "dtype": a.dtype if measured else "float32"},
                              tag=f"{size}-attribute" + ("" if measured else "-graph-only"))
        actor_pids = {int(x.rsplit(":", 1)[1]) for x in (att or {}).get("actors", [])}
        base_actor = None
        if att:
            bpid = att["baseline"]["pid"]
            seen = [p for p in summarize_procs(run) if p["pid"] == bpid]
            base_actor = max([att["baseline"].get("VmHWM", 0), *(p["peak_rss_bytes"] for p in seen)])
            base.setdefault("actor", {})[size] = base_actor
            base.setdefault("actor_bytes_moved", {})[size] = max((p["rchar"] + p["wchar"] for p in seen),
                                                                 default=None)
            base.setdefault("actor_anon", {})[size] = max([att["baseline"].get("RssAnon", 0),
                                                           *(p["peak_anon_bytes"] for p in seen)])
        nodes = (att or {}).get("graph_nodes")
        if measured:
            self.row(size, info, "attribute", 1, run, ("actor",), base_actor, actor_pids,
                     baseline_bytes_moved=base.get("actor_bytes_moved", {}).get(size),
                     n_items=len(forget), attribution_cfg=cfg,
                     items_per_s=(round(att["n_items"] / att["shard_seconds"], 4)
                                  if att and att["shard_seconds"] else None),
                     attribution_compute_s=(att or {}).get("shard_seconds"),
                     graph_nodes=nodes, mlp_neurons=total_neurons,
                     edited_fraction=(nodes / total_neurons) if nodes is not None else None,
                     edited_fraction_language=(nodes / neurons["language"]) if nodes is not None else None,
                     dtype=a.dtype or "loader default (auto: the stored bf16)")
        if att is None:
            return
        rank_base = (base.get("rank") or {}).get("peak_rss_bytes")
        for ranks in map(int, a.ranks.split(",")) if "edit" in stages else ():
            out = root / "batches" / f"scale-{size}-ws{ranks}" / "edited"  # in the store, as in the service
            spec = {"model_uri": model_uri, "bench_uri": str(bench), "forget": forget,
                    "retain_item_ids": retain, "graph_uri": graph_uri, "output_uri": str(out),
                    "method": "mip",
                    "edit": {"rmisu": {"steps": work["edit_steps"], "batch_size": work["edit_batch"]}},
                    "lineage": {"batch_id": f"scale-{size}-ws{ranks}", "base_version": reg["version"]}}
            run, ed = self.stage("edit", {"spec": spec, "spec_uri": str(sw / f"edit-ws{ranks}" / "spec.json"),
                                          "log_uri": str(sw / f"edit-ws{ranks}" / "edit.log"), "ranks": ranks,
                                          "timeout_s": a.stage_timeout_s - 60, "ds_profile": a.ds_profile},
                                 tag=f"{size}-edit-ws{ranks}")
            summary = (ed or {}).get("summary") or {}
            n_edited = summary.get("neurons")
            written = new_bytes(out) if out.exists() else None
            self.row(size, info, "edit", ranks, run, ("rank",), rank_base,
                     baseline_bytes_moved=(base.get("rank") or {}).get("bytes_moved"),
                     edited_neurons=n_edited, graph_nodes=nodes, mlp_neurons=total_neurons,
                     edited_fraction=(n_edited / total_neurons) if n_edited else
                     ((nodes / total_neurons) if nodes is not None else None),
                     rmisu={"steps": work["edit_steps"], "batch_size": work["edit_batch"]},
                     retain_items=len(retain),
                     output=written, summary={k: summary.get(k) for k in (
                         "world_size", "zero_stage", "seconds", "edit_seconds", "memory", "files",
                         "ds_profile", "dtype") if k in summary})
            if ed is None or "publish" not in stages:
                continue
            run, pub = self.stage("publish", {"root": str(root), "name": "scale", "source": str(out),
                                              "bench": str(bench), "parent": reg["version"],
                                              "batch_id": f"scale-{size}-ws{ranks}"},
                                  tag=f"{size}-publish-ws{ranks}")
            published = None
            if pub:
                published = new_bytes(Path(pub["uri"]))
            self.row(size, info, "publish", ranks, run, ("driver",), None, version=(pub or {}).get("version"),
                     call_io=(pub or {}).get("io_delta"),
                     call_bytes_moved=_moved((pub or {}).get("io_delta")),
                     how=(pub or {}).get("how"), published=published,
                     edited_fraction=(n_edited / total_neurons) if n_edited else None)
        if not a.keep:
            shutil.rmtree(sw, ignore_errors=True)


def reconcile(row: dict[str, Any]) -> dict[str, Any]:
    """An edit row's peak RSS: the monitor's, or the ranks' own VmHWM readings (``memory`` of the job's
    summary, before and while writing) where they are higher. The polls can miss a rank's last peak (it resets
    VmHWM before writing and exits soon after), and one rank of a job can be missed altogether."""
    memory = (row.get("summary") or {}).get("memory") or []
    own = max((1024 * max(m.get("peak_rss_kib", 0), m.get("write_peak_kib", 0)) for m in memory), default=0)
    if own:
        row["self_reported_peak_rss_bytes"] = own
        if own > (row.get("peak_rss_bytes") or 0):
            row["peak_rss_bytes"] = own
            if row.get("baseline_rss_bytes"):
                row["peak_beyond_baseline_bytes"] = own - row["baseline_rss_bytes"]
    return row


def _moved(io: dict[str, int] | None) -> int | None:
    return None if not io else io.get("rchar", 0) + io.get("wchar", 0)


def _print_row(r: dict[str, Any]) -> None:
    def g(x: Any) -> str:
        return "-" if x is None else f"{x / GiB:.2f}"
    print(f"    {r['model']:6s} {r['stage']:9s} ws={r['world_size']} {r['status'][:40]:10s} "
          f"peak {g(r['peak_rss_bytes'])} GiB (anon {g(r['peak_anon_bytes'])}, baseline "
          f"{g(r['baseline_rss_bytes'])}), moved {g(r['bytes_moved'])} GiB, "
          f"storage {g(r['storage_bytes'])} GiB, "
          f"model {g(r['model_bytes'])} GiB, {r['wall_s']} s", flush=True)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------ extrapolation
#: Constants of the extrapolation (stated, not measured).
CONSTANTS = {
    "gpu_memory_bytes": 80e9,  # H100 80 GB
    "gpu_usable_fraction": 0.9,  # CUDA context, allocator fragmentation
    "gpus_per_node": 8,
    "gpu_peak_flops": 989e12,  # H100 SXM dense bf16
    "mfu": 0.40,  # model FLOPs utilisation assumed for the attribution passes
    "m_steps": 4,  # interpolation copies (AttributionConfig.steps default)
    "text_tokens": 300,  # tokens per text item (question + answer + chat template)
    "image_side_px": 448,  # one image per multimodal item
    "flops_per_param_token": 4,  # forward 2N + activation-only backward <= 2N (frozen: no weight grads)
    "rmisu_steps": 300, "rmisu_batch": 6, "items_per_batch": 100,
    "gate_items": 400,  # multiple-choice items scored per batch, 4 options each, on two models
}


def qwen72b_counts() -> dict[str, Any]:
    """Qwen2.5-VL-72B's parameters by part, counted on the meta device (``mip_core.modeling.shapes``)."""
    from mip_core.modeling.shapes import meta_model, shape_config

    config = shape_config("qwen2_5_vl_72b")
    parts = {"language_layers": 0, "embedding": 0, "lm_head": 0, "vision": 0}
    for name, p in meta_model(config).named_parameters():
        if "visual" in name:
            parts["vision"] += p.numel()
        elif "embed_tokens" in name:
            parts["embedding"] += p.numel()
        elif name.startswith("lm_head"):
            parts["lm_head"] += p.numel()
        else:
            parts["language_layers"] += p.numel()
    text, vision = config.text_config, config.vision_config
    return {"source": "mip_core.modeling.shapes.shape_config('qwen2_5_vl_72b'), counted on the meta device",
            **parts, "total": sum(parts.values()), "layers": int(text.num_hidden_layers),
            "hidden": int(text.hidden_size), "intermediate": int(text.intermediate_size),
            "vision_depth": int(vision.depth), "patch": int(vision.patch_size),
            "merge": int(vision.spatial_merge_size)}


def extrapolate(doc: dict[str, Any]) -> dict[str, Any]:
    """Qwen2.5-VL-72B on 8 x 80 GB nodes from the measured constants; every formula is in the output."""
    K = CONSTANTS
    rows = sorted((r for r in doc.get("rows", []) if r.get("status") == "ok"), key=lambda r: -r["params"])

    def largest(*wanted: tuple[str, int]) -> list[dict[str, Any] | None]:
        """The rows ``wanted`` ((stage, world size) pairs) of the largest model with all of them measured."""
        for model in dict.fromkeys(r["model"] for r in rows):
            found = [next((r for r in rows if r["model"] == model and (r["stage"], r["world_size"]) == w),
                          None) for w in wanted]
            if all(found):
                return found
        return [None] * len(wanted)

    [att] = largest(("attribute", 1))
    e1, e2 = largest(("edit", 1), ("edit", 2))
    p72 = qwen72b_counts()
    N = p72["total"]
    model_bytes = 2 * N  # bf16
    measured: dict[str, Any] = {"attribution_from_model": att and att["model"],
                                "edit_from_model": e2 and e2["model"]}
    # attribution actor: state = model bytes x a measured factor (weights as loaded + activations + buffers)
    a_factor = (att["peak_beyond_baseline_bytes"] / att["model_bytes"]) if att and att.get(
        "peak_beyond_baseline_bytes") else None
    measured["actor_beyond_runtime_per_model_byte"] = a_factor
    usable = K["gpu_memory_bytes"] * K["gpu_usable_fraction"]
    # On a GPU the activations of one pass scale with the items in flight, not with the model: take the
    # measured factor as the weights' footprint (>= 1 model copy in the loaded dtype).
    a_state = model_bytes * max(1.0, a_factor or 1.0)
    gpus_per_actor = math.ceil(a_state / usable)
    gpus_per_actor = 1 << (gpus_per_actor - 1).bit_length()  # a power of two, so actors pack a node
    # edit: per-rank state beyond the fixed runtime = model bytes x (c_shared + c_part / world size), fitted
    # on the measured 1-rank and 2-rank figures (r1 = c_s + c_p, r2 = c_s + c_p / 2)
    r1, r2 = (e["peak_beyond_baseline_bytes"] / e["model_bytes"] if e and e.get("peak_beyond_baseline_bytes")
              else None for e in (e1, e2))
    edit: dict[str, Any] = {"r1_per_model_byte": r1, "r2_per_model_byte": r2}
    ranks = K["gpus_per_node"]
    if r1 is not None and r2 is not None:
        c_part, c_shared = 2 * (r1 - r2), 2 * r2 - r1
        per_rank = model_bytes * (c_shared + c_part / ranks)
        if c_part <= 0:  # a rank held more at 2 ranks than at 1: nothing measured says it falls with ranks
            per_rank = model_bytes * r2
            edit["note"] = ("the measured per-rank state did not fall from 1 to 2 ranks (r2 >= r1), so no "
                            "partitioning can be fitted; per_rank_bytes_8_ranks assumes it stays at the "
                            "2-rank figure (r2 x model bytes)")
        edit.update({"c_shared": c_shared, "c_part": c_part, "per_rank_bytes_8_ranks": per_rank,
                     "ratio_2_to_1": r2 / r1 if r1 else None})
        edit["offload"] = per_rank > usable
    # by design (not measured): ZeRO-3 keeps 1/ranks of the bf16 weights per GPU plus the modules gathered at
    # once (one decoder layer's MLP at a time for the edited sites, twice for prefetch)
    layer_mlp = 3 * p72["hidden"] * p72["intermediate"] * 2
    edit["by_design_per_rank_bytes"] = model_bytes / ranks + 2 * layer_mlp
    edit["by_design_offload"] = edit["by_design_per_rank_bytes"] > usable
    # FLOPs (frozen parameters): 4 N per token per layer pass, m copies, one pass per layer of the branch's
    # tower
    lm_n = p72["language_layers"] + p72["lm_head"]
    vis_n = p72["vision"]
    L_t, L_v, m = p72["layers"], p72["vision_depth"], K["m_steps"]
    patches = (K["image_side_px"] // p72["patch"]) ** 2
    image_tokens = patches // p72["merge"] ** 2
    f = K["flops_per_param_token"]
    text_flops = L_t * m * f * lm_n * K["text_tokens"]
    mm_flops = L_v * m * f * (lm_n * (K["text_tokens"] + image_tokens) + vis_n * patches)
    rate = K["gpu_peak_flops"] * K["mfu"]
    per_1000 = {}
    for mix, flops in (("text", 1000 * text_flops), ("multimodal", 1000 * mm_flops),
                       ("half_and_half", 500 * (text_flops + mm_flops))):
        busy_h = flops / rate / 3600
        # a model split over g GPUs by layer (device_map) runs one GPU at a time: g GPUs are held per item
        per_1000[mix] = {"flops": flops, "gpu_hours_compute": busy_h,
                         "gpu_hours_held": busy_h * gpus_per_actor}
    edit_flops = K["rmisu_steps"] * 2 * K["rmisu_batch"] * K["text_tokens"] * 6 * N
    edit_hours = edit_flops / rate / 3600
    gate_flops = 2 * K["gate_items"] * 4 * 2 * N * K["text_tokens"]
    batches = 1000 / K["items_per_batch"]
    return {
        "target": "Qwen2.5-VL-72B on nodes of 8 x 80 GB GPUs",
        "constants": K,
        "params": p72,
        "measured_constants": {**measured, "edit": edit, "baseline_rss": doc.get("baselines", {})},
        "formulas": {
            "model_bytes": "2 * N (bf16)",
            "gpus_per_actor": "next power of two >= 2 * N * max(1, actor_beyond_runtime_per_model_byte) / "
                              "(gpu_memory_bytes * gpu_usable_fraction)",
            "edit_per_rank": "2 * N * (c_shared + c_part / ranks), c_part = 2 (r1 - r2), c_shared = 2 r2 - "
                             "r1, r_w = (rank peak RSS - empty rank) / model bytes at w ranks; offload when "
                             "it exceeds gpu_memory_bytes * gpu_usable_fraction",
            "text_item_flops": "L_text * m * 4 * N_lm * tokens_text",
            "multimodal_item_flops": "L_vision * m * 4 * (N_lm * (tokens_text + image_tokens) + N_vision * "
                                     "patches), patches = (side / 14)^2, image_tokens = patches / 4",
            "gpu_hours_compute": "flops / (gpu_peak_flops * mfu) / 3600",
            "gpu_hours_held": "gpu_hours_compute * gpus_per_actor (layer-split model: one GPU busy at a "
                              "time)",
            "edit_flops_per_batch": "rmisu_steps * 2 * rmisu_batch * tokens_text * 6 * N (upper bound: full "
                                    "forward + backward + frozen reference)",
        },
        "per_item": {"text_flops": text_flops, "multimodal_flops": mm_flops, "image_tokens": image_tokens,
                     "patches": patches, "N_lm": lm_n, "N_vision": vis_n},
        "gpus_per_actor": gpus_per_actor, "actors_per_node": K["gpus_per_node"] // gpus_per_actor,
        "edit_ranks": ranks, "edit_nodes": 1,
        "attribution_per_1000_items": per_1000,
        "edit_per_1000_items": {"batches": batches, "flops": batches * edit_flops,
                                "gpu_hours_compute_on_8": batches * edit_hours,
                                "gpu_hours_held": batches * edit_hours},
        "gate_per_1000_items": {"flops": batches * gate_flops,
                                "gpu_hours_compute": batches * gate_flops / rate / 3600},
    }


def checks(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against the measured rows (largest model measured)."""
    rows = [r for r in doc.get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return {}
    big = max(rows, key=lambda r: r["params"])["model"]
    mine = [r for r in rows if r["model"] == big]
    stopped = [r for r in doc["rows"] if r["model"] == big and r.get("status", "").startswith("aborted")]

    def one(stage: str, ws: int) -> dict[str, Any] | None:
        return next((r for r in mine if r["stage"] == stage and r["world_size"] == ws), None)

    out: dict[str, Any] = {"model": big}
    e1, e2 = one("edit", 1), one("edit", 2)
    bound = False
    if e2 is None:  # stopped by the memory guard: its peak so far is a lower bound of the rank's peak
        e2 = next((r for r in stopped if r["stage"] == "edit" and r["world_size"] == 2), None)
        bound = e2 is not None
    b1, b2 = (e and e.get("peak_beyond_baseline_bytes") for e in (e1, e2))
    if b1 and b2 is not None:
        ratio = b2 / b1
        out["edit_2_ranks_vs_1_beyond_runtime"] = {
            "ratio": round(ratio, 3), "lower_bound": bound, "target": "<= 0.6", "met": ratio <= 0.6,
            "rank_peak_bytes": [e1["peak_rss_bytes"], e2["peak_rss_bytes"]]}
    base = doc.get("baselines", {})
    runtime_anon = {"edit": (base.get("rank") or {}).get("peak_anon_bytes") or 0,
                    "attribute": (base.get("actor_anon") or {}).get(big) or 0}

    def anon_beyond(r: dict[str, Any]) -> int:
        return (r.get("peak_anon_bytes") or 0) - runtime_anon.get(r["stage"], 0)

    worst = max(mine + stopped, key=anon_beyond)
    beyond, fp32 = anon_beyond(worst), 4 * worst["params"]
    out["no_float32_copy"] = {
        "largest_anon_beyond_runtime_bytes": beyond, "stage": worst["stage"],
        "world_size": worst["world_size"],
        "peak_rss_beyond_runtime_bytes": worst.get("peak_beyond_baseline_bytes"),
        "float32_model_bytes": fp32, "fraction_of_float32": round(beyond / fp32, 3),
        "target": "no process's anonymous memory beyond its runtime reaches the float32 model's bytes (a "
                  "copy is anonymous memory; the memory-mapped bf16 checkpoint counts in VmHWM as file "
                  "pages)",
        # a run stopped by the memory guard below the bar proves nothing either way
        "met": None if worst in stopped and beyond < fp32 else beyond < fp32,
        "includes_stopped_runs": bool(stopped)}
    moved = []
    for ws in (1, 2):
        e, p = one("edit", ws), one("publish", ws)
        if not (e and p):
            continue
        rank_writes = max((w["write_bytes"] for w in e["work_processes"]), default=0)
        written = (e.get("output") or {}).get("own_bytes", rank_writes)
        pub = p.get("call_bytes_moved") or 0
        worst_bytes = max(rank_writes, pub)
        moved.append({"world_size": ws, "edited_fraction": e.get("edited_fraction"),
                      "edit_rank_write_bytes": rank_writes, "edited_output_own_bytes": written,
                      "publish_call_bytes": pub, "model_bytes": e["model_bytes"],
                      "fraction_of_model": round(worst_bytes / e["model_bytes"], 3),
                      "met": (e.get("edited_fraction") or 1) > 0.01 or worst_bytes <= 0.1 * e["model_bytes"]})
    out["publish_bytes"] = {
        "target": "with <= 1 % of MLP neurons edited, <= 10 % of the model's bytes through any one process "
                  "(edit rank writes, publish call reads + writes)",
        "runs": moved, "met": bool(moved) and all(m["met"] for m in moved)}
    return out


def print_extrapolation(x: dict[str, Any]) -> None:
    e = x["measured_constants"]["edit"]
    print("\n== extrapolated (not measured): " + x["target"])
    print(f"N = {x['params']['total'] / 1e9:.1f} B parameters ({x['params']['source']})")
    for k, v in x["formulas"].items():
        print(f"  {k}: {v}")
    print(f"  constants: {json.dumps(x['constants'])}")
    a = x["measured_constants"].get("actor_beyond_runtime_per_model_byte")
    print(f"attribution actor: {a if a is None else round(a, 2)} x model bytes beyond the runtime (measured) "
          f"-> {x['gpus_per_actor']} GPUs per actor, {x['actors_per_node']} actors per node")
    if e.get("c_part") is not None:
        print(f"edit: r1 = {e['r1_per_model_byte']:.2f}, r2 = {e['r2_per_model_byte']:.2f} (measured) -> "
              f"{e['per_rank_bytes_8_ranks'] / 1e9:.1f} GB per rank at 8 ranks, offload: {e['offload']}")
    for mix, v in x["attribution_per_1000_items"].items():
        print(f"attribution, 1,000 {mix} items: {v['flops']:.2e} FLOPs, {v['gpu_hours_compute']:.1f} GPU-h "
              f"of compute, {v['gpu_hours_held']:.1f} GPU-h held")
    ed = x["edit_per_1000_items"]
    print(f"edit: {ed['batches']:.0f} batches, {ed['flops']:.2e} FLOPs, {ed['gpu_hours_compute_on_8']:.1f} "
          f"GPU-h; gate: {x['gate_per_1000_items']['gpu_hours_compute']:.2f} GPU-h")


def main() -> int:
    argv = [x for x in sys.argv[1:] if not x.startswith("--local_rank")]  # the DeepSpeed launcher adds it
    if argv and argv[0] == "_stage":
        return stage_main(argv[1:])
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="0.1b,0.5b,1.5b", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--ranks", default="1,2", help="DeepSpeed world sizes of the edit")
    ap.add_argument("--work", default="demo_out/scale_bench",
                    help="models, stores and logs (models are reused)")
    ap.add_argument("--out", default="benches/results/scale.json")
    ap.add_argument("--append", action="store_true", help="keep the rows of other sizes already in --out")
    ap.add_argument("--profiles", type=int, default=8, help="people in the synthetic benchmark")
    ap.add_argument("--items", type=int, default=None,
                    help="text forget items attributed and edited on (default: 4, fewer at the larger sizes, "
                         "SIZE_WORK)")
    ap.add_argument("--retain", type=int, default=6, help="retain items of the edit")
    ap.add_argument("--attr-steps", type=int, default=1, help="AttributionConfig.steps (m)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--edit-steps", type=int, default=None, help="RMisU steps (default 2, SIZE_WORK)")
    ap.add_argument("--edit-batch", type=int, default=None,
                    help="RMisU batch: forget inputs per step (default 2, at least the world size)")
    ap.add_argument("--dtype", default=None, help="attribute_batch dtype (default: the loader's)")
    ap.add_argument("--ds-profile", default=None, help="launch_edit ds_profile (default: launch_edit's)")
    ap.add_argument("--mem-limit-gib", type=float, default=10.0)
    ap.add_argument("--stage-timeout-s", type=float, default=2400)
    ap.add_argument("--keep", action="store_true", help="keep stores and edited models")
    ap.add_argument("--stages", default="register,attribute,edit,publish",
                    help="stages recorded as rows; without attribute the path graph is made in float32, "
                         "unrecorded")
    ap.add_argument("--remeasure-baselines", action="store_true")
    ap.add_argument("--extrapolate-only", action="store_true",
                    help="recompute the extrapolation and checks from --out, print the markdown tables")
    args = ap.parse_args()
    if args.extrapolate_only:
        doc = json.loads(Path(args.out).read_text())
        for row in doc.get("rows", []):
            reconcile(row)
        doc["extrapolated"] = extrapolate(doc)
        doc["checks"] = checks(doc)
        print(json.dumps(doc["checks"], indent=1))
        Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print_extrapolation(doc["extrapolated"])
        print("\n" + markdown(doc))
        return 0
    bench = Bench(args)
    t0 = time.perf_counter()
    bench.baselines()
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
        bench.size(size)
    bench.doc["measured"]["total_wall_s"] = round(time.perf_counter() - t0, 1)
    bench.doc["extrapolated"] = extrapolate(bench.doc)
    bench.doc["checks"] = checks(bench.doc)
    bench.save()
    print(json.dumps(bench.doc["checks"], indent=1))
    print_table(bench.doc)
    print_extrapolation(bench.doc["extrapolated"])
    return 0


def markdown(doc: dict[str, Any]) -> str:
    """The measured and the extrapolated tables of BENCHMARKS.md section 7."""
    def gib(x: Any) -> str:
        return "-" if x is None else f"{x / GiB:.2f}"

    lines = ["**Measured** (" + doc["measured"]["date"] + ", " + doc["measured"]["machine"] + "):", "",
             "| model | params | stage | ranks | peak RSS GiB | runtime GiB | beyond runtime GiB | model GiB "
             "(bf16) | x model | written GiB | moved GiB (rchar+wchar) | edited MLP neurons | wall s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        beyond = r.get("peak_beyond_baseline_bytes")
        written = max((w["write_bytes"] for w in r["work_processes"]), default=None)
        moved = r.get("call_bytes_moved") if r["stage"] in ("publish", "register") else r.get("bytes_moved")
        ef = r.get("edited_fraction")
        status = "" if r["status"] == "ok" else f" ({r['status'][:60]})"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['stage']}{status} | {r['world_size']} | "
            f"{gib(r['peak_rss_bytes'])} | {gib(r['baseline_rss_bytes'])} | {gib(beyond)} | "
            f"{gib(r['model_bytes'])} | {'-' if beyond is None else round(beyond / r['model_bytes'], 2)} | "
            f"{gib(written)} | {gib(moved)} | "
            f"{'-' if ef is None else f'{100 * ef:.2f} %'} | {r['wall_s']:.0f} |")
    x = doc.get("extrapolated")
    if x:
        e = x["measured_constants"]["edit"]
        a = x["attribution_per_1000_items"]
        lines += ["", f"**Extrapolated** (computed, not measured) to {x['target']}, N = "
                      f"{x['params']['total'] / 1e9:.1f} B:", "", "| quantity | value | from |",
                  "|---|---:|---|"]
        af = x["measured_constants"].get("actor_beyond_runtime_per_model_byte")
        lines.append(f"| GPUs per attribution actor | {x['gpus_per_actor']} ({x['actors_per_node']} actors "
                     f"per node) | 2 N bytes x max(1, {af if af is None else round(af, 2)}) (measured actor "
                     f"state per model byte) "
                     f"/ 72 GB usable per GPU, rounded up to a power of two |")
        if e.get("per_rank_bytes_8_ranks") is not None:
            lines.append(f"| edit ranks | {x['edit_ranks']} on {x['edit_nodes']} node | one per GPU |")
            lines.append(f"| edit state per rank at 8 ranks | {e['per_rank_bytes_8_ranks'] / 1e9:.0f} GB | "
                         f"2 N x (c_shared {e['c_shared']:.2f} + c_part {e['c_part']:.2f} / 8), fitted on "
                         f"the measured 1- and 2-rank figures |")
            lines.append(f"| parameter offload | {'yes' if e['offload'] else 'no'} | per-rank state vs 72 GB "
                         f"|")
            if e.get("note"):
                lines.append(f"| (note) | | {e['note']} |")
        lines.append(f"| edit state per rank by design (not measured) | "
                     f"{e['by_design_per_rank_bytes'] / 1e9:.0f} GB, offload "
                     f"{'yes' if e['by_design_offload'] else 'no'} | 2 N / 8 + two gathered decoder-layer "
                     f"MLPs (bf16), what ZeRO-3 with the gpu profile is meant to hold |")
        for mix, label in (("text", "1,000 text items"), ("multimodal", "1,000 multimodal items"),
                           ("half_and_half", "1,000 items, half each")):
            v = a[mix]
            lines.append(f"| attribution GPU-hours, {label} | {v['gpu_hours_compute']:.1f} compute, "
                         f"{v['gpu_hours_held']:.0f} held | {v['flops']:.2e} FLOPs at "
                         f"{x['constants']['mfu']:.0%} of {x['constants']['gpu_peak_flops'] / 1e12:.0f} "
                         f"TFLOP/s; held = x GPUs per actor |")
        ed = x["edit_per_1000_items"]
        lines.append(f"| edit GPU-hours per 1,000 items | {ed['gpu_hours_compute_on_8']:.1f} | "
                     f"{ed['batches']:.0f} batches of {x['constants']['items_per_batch']}, {ed['flops']:.2e} "
                     f"FLOPs |")
        lines.append(f"| gate GPU-hours per 1,000 items | "
                     f"{x['gate_per_1000_items']['gpu_hours_compute']:.2f} | "
                     f"{x['constants']['gate_items']} items x 4 options x 2 models per batch, forward only |")
    return "\n".join(lines)


def print_table(doc: dict[str, Any]) -> None:
    def g(x: Any) -> str:
        return "-" if x is None else f"{x / GiB:.2f}"

    print("\n== measured\n| model | params | stage | world size | peak RSS GiB | of it anon | baseline GiB | "
          "model GiB | moved (rchar+wchar) GiB | storage GiB | edited fraction | wall s | status |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in doc["rows"]:
        ef = r.get("edited_fraction")
        print(f"| {r['model']} | {r['params'] / 1e9:.3f} B | {r['stage']} | {r['world_size']} | "
              f"{g(r['peak_rss_bytes'])} | {g(r['peak_anon_bytes'])} | {g(r['baseline_rss_bytes'])} | "
              f"{g(r['model_bytes'])} | {g(r['bytes_moved'])} | {g(r['storage_bytes'])} | "
              f"{'-' if ef is None else f'{100 * ef:.3f} %'} | {r['wall_s']} | {r['status'][:30]} |")


if __name__ == "__main__":
    sys.exit(main())
