"""One-GPU check of the 70B path at 7B shape: attribution, a ZeRO-3 edit step over NCCL, the gate, a publish.

For a machine with one CUDA GPU (an H200 is what gets lent), in at most about 8 minutes, nothing downloaded:

1. a Qwen2.5-VL-7B-shaped model (``mip_core.modeling.shapes``: 28 layers of 3584 x 18944, the 32-block vision
   tower, the published vocabulary size) with random bf16 weights, built directly on the GPU, saved as sharded
   safetensors with a tiny tokenizer and image processor (as the project's tiny models), registered in a local
   store as ``v0001``;
2. attribution (``mip_core.attribution.attribute_items``, what each Ray actor runs) of a few text and image
   items of a synthetic benchmark, the model loaded by ``load_model`` in its stored dtype: items/s and peak
   GPU memory (``torch.cuda.max_memory_allocated``);
3. one RMisU step as a 1-rank DeepSpeed ZeRO-3 job over NCCL (``run_edit(distributed=True)`` in a subprocess,
   the ``gpu`` profile), writing the edited shards;
4. the gate: multiple-choice scoring of the forget, retain and utility items on both models
   (``mip_core.service.gate.evaluate_and_gate``);
5. publication of the edited model as ``v0002`` (``ServiceStore.register_model``: shards the edit did not
   rewrite are hard links);

then prints ONE JSON line of figures and runs the CUDA tests (``pytest -m gpu``).

    python benches/gpu_check.py             # on the GPU machine (make gpu-check)
    python benches/gpu_check.py --dry-run   # the same code path on CPU with a tiny shape, under a minute

Exit status: 0 when every stage and the tests passed; 2 without a GPU (except with --dry-run); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "mip-gpu-check/1"


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)


class Memory:
    """Peak memory of a stage: ``torch.cuda.max_memory_allocated`` on a GPU, the process's VmHWM on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.kind = "torch.cuda.max_memory_allocated" if cuda else "VmHWM (process peak RSS)"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _peak_rss()

    def now(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)


def _shape(dry_run: bool, tokenizer: Any) -> tuple[Any, str]:
    from mip_core.modeling.shapes import scaled_config, shape_config

    if dry_run:  # the same architecture at a tiny width; the local tokenizer's vocabulary
        return scaled_config("qwen2_5_vl", 128, 512, 2, 2, len(tokenizer), tokenizer=tokenizer,
                             vision_hidden=64, vision_intermediate=128), "qwen2_5_vl tiny (dry run)"
    ref = shape_config("qwen2_5_vl_7b")
    t, v = ref.text_config, ref.vision_config
    # the published 7B widths and vocabulary size, with the local tokenizer's special-token ids
    config = scaled_config("qwen2_5_vl", t.hidden_size, t.intermediate_size, t.num_hidden_layers, v.depth,
                           t.vocab_size, tokenizer=tokenizer, heads=t.num_attention_heads,
                           kv_heads=t.num_key_value_heads, vision_hidden=v.hidden_size,
                           vision_intermediate=v.intermediate_size)
    return config, "qwen2_5_vl_7b"


def build_and_save(out: Path, device: str, dry_run: bool) -> dict[str, Any]:
    import torch

    from mip_core.adapters import adapter_class
    from mip_core.adapters.base import TinySize
    from mip_core.benchmark import corpus_for_tokenizer
    from mip_core.modeling.shapes import param_count
    from mip_core.modeling.tokenizer import train_tokenizer

    cls = adapter_class("qwen2_5_vl")
    tokenizer = train_tokenizer(corpus_for_tokenizer(), cls.special_tokens, pad_token=cls.pad_token,
                                eos_token=cls.eos_token, image_token=cls.image_token)
    config, shape = _shape(dry_run, tokenizer)
    patch = int(config.vision_config.patch_size)
    processor = cls.build_processor(tokenizer, TinySize(
        "check", hidden=0, mlp=0, layers=0, heads=1, kv_heads=1, vision_depth=0, vision_width=0, vision_mlp=0,
        vision_heads=1, image_size=patch * 4, patch=patch))  # 56 x 56 px: 16 patches, 4 tokens after merging
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # materialised where it runs: no host copy of a 16 GB model
        model = cls.model_class._from_config(config, dtype=torch.bfloat16)
    model.eval()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model.save_pretrained(out, max_shard_size="4GB" if not dry_run else "2MB", safe_serialization=True)
    processor.save_pretrained(out)
    save_s = time.perf_counter() - t0
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"shape": shape, "params": params, "params_meta": param_count(config),
            "model_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
            "shards": len(list(out.glob("*.safetensors"))), "build_s": round(build_s, 2),
            "save_s": round(save_s, 2)}


def pick_items(bench: Any, n_text: int, n_image: int) -> tuple[list[Any], list[Any], list[Any]]:
    qa = [it for it in bench.items if it.kind == "qa"]
    forget_people = {"p0000", "p0001"}
    text = [it for it in qa if it.modality == "text" and it.profile_id in forget_people][:n_text]
    image = [it for it in qa if it.modality == "multimodal" and it.profile_id in forget_people][:n_image]
    retain = [it for it in qa if it.profile_id not in forget_people][:8]
    utility = [it for it in bench.items if it.kind == "utility"][:4]
    return text + image, retain, utility


def attribute(model_uri: str, bench: Any, items: list[Any], device: str, mem: Memory, dry_run: bool
              ) -> tuple[dict[str, Any], Any]:
    from mip_core.attribution import AttributionConfig, attribute_items
    from mip_core.modeling import load_model
    from mip_core.path_graph import reduce_paths

    mem.reset()
    t0 = time.perf_counter()
    loaded = load_model(model_uri, device=device)  # "auto": the checkpoint's bf16
    load_s = time.perf_counter() - t0
    weights = mem.now()
    cfg = AttributionConfig(steps=2 if dry_run else 4, top_k=5, batch_items=4)
    t0 = time.perf_counter()
    paths, failures = attribute_items(loaded.model, loaded.adapter, loaded.processor, bench, items, cfg,
                                      request_ids={it.item_id: f"req-{it.profile_id}" for it in items})
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    graph = reduce_paths(paths, run_id="gpu-check")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in loaded.model.parameters()})
    out = {"items": len(items), "attributed": len(paths), "failures": [f.reason[:200] for f in failures],
           "seconds": round(seconds, 2), "items_per_s": round(len(paths) / seconds, 3) if seconds else None,
           "load_s": round(load_s, 2), "weights_bytes": weights, "peak_bytes": mem.peak(),
           "steps": cfg.steps, "top_k": cfg.top_k, "graph_nodes": len(graph), "dtype": "+".join(dtypes)}
    del loaded
    return out, graph


def edit(spec_path: Path, profile: str, timeout_s: float, cuda: bool) -> dict[str, Any]:
    """One ZeRO-3 RMisU step in a 1-rank job (NCCL on a GPU, gloo on CPU), in its own process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cuda" if cuda else "cpu", GLOO_SOCKET_IFNAME="lo")
    if not cuda:
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "mip-torch-extensions"))
    result = spec_path.with_name("edit_result.json")
    log = spec_path.with_name("edit.log")
    t0 = time.perf_counter()
    with log.open("wb") as f:
        argv = [sys.executable, str(Path(__file__).resolve()), "_edit", str(spec_path), profile, str(result)]
        proc = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"edit job exited {proc.returncode}; log {log}:\n" + "\n".join(tail))
    out = json.loads(result.read_text())
    out["seconds_with_start"] = round(seconds, 2)
    return out


def edit_job(spec_file: str, profile: str, result_file: str) -> int:
    """The edit subprocess: ``run_edit(distributed=True)`` under ZeRO-3 with the named profile."""
    import torch

    from mip_core.entrypoints.edit import read_spec, run_edit
    from mip_core.entrypoints.edit_plan import ds_config_for

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    spec = read_spec(spec_file)
    config = ds_config_for(profile, zero_stage=3)
    summary = run_edit(spec, distributed=True, ds_config=config, log=lambda m: print(m, flush=True))
    import torch.distributed as dist

    out = {"world_size": summary.get("world_size"),
           "zero_stage": summary.get("zero_stage") or config["zero_optimization"]["stage"],
           "backend": "nccl" if cuda else "gloo", "profile": profile, "steps": summary.get("steps"),
           "neurons": summary.get("neurons"), "seconds": summary.get("seconds"),
           "edit_seconds": summary.get("edit_seconds"), "partitioned": summary.get("partitioned"),
           "files": summary.get("files"), "rank_memory": summary.get("memory"),
           "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else _peak_rss(),
           "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "VmHWM",
           "process_group_closed": not dist.is_initialized()}
    Path(result_file).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


def gate(base_uri: str, edited_uri: str, bench: Any, sets: dict[str, list[Any]], device: str, mem: Memory
         ) -> dict[str, Any]:
    import torch

    from mip_core.modeling import load_model
    from mip_core.modeling.inputs import inputs_follow_model
    from mip_core.service.gate import GateConfig, evaluate_and_gate

    mem.reset()
    t0 = time.perf_counter()
    base, edited = load_model(base_uri, device=device), load_model(edited_uri, device=device)
    load_s = time.perf_counter() - t0
    for m in (base.model, edited.model):
        inputs_follow_model(m)
    t0 = time.perf_counter()
    decision = evaluate_and_gate(base.model, edited.model, edited.processor, bench, sets, GateConfig(),
                                 log=lambda _: None)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = sum(len(v) for v in sets.values())
    return {"items": n, "options_scored": 2 * sum(len(it.options) for v in sets.values() for it in v),
            "seconds": round(seconds, 2), "items_per_s": round(2 * n / seconds, 3) if seconds else None,
            "load_s": round(load_s, 2), "peak_bytes": mem.peak(), "passed": decision.passed,
            "scores": {f"{s.items}/{s.modality}": [round(s.before, 3), round(s.after, 3)]
                       for s in decision.scores}}


def _files(folder: Path) -> dict[str, int]:
    from scale_bench import new_bytes  # benches/ is this script's own folder, first on sys.path

    return new_bytes(folder)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    threads = min(8, os.cpu_count() or 1) if cuda else int(os.environ.get("MIP_THREADS", "1"))
    torch.set_num_threads(threads)
    mem = Memory(cuda)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mip-gpu-check-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict[str, Any] = {"schema": SCHEMA, "dry_run": args.dry_run, "device": device,
                           "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                           "peak_kind": mem.kind, "ok": False, "errors": {}}
    t_all = time.perf_counter()

    def stage(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line, the run goes on where it can
            import traceback

            out["errors"][name] = f"{type(exc).__name__}: {exc}"[-1500:]
            traceback.print_exc(file=sys.stderr)
            return None
        finally:
            print(f"gpu-check: {name} {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    from mip_core.benchmark import load_benchmark, make_benchmark
    from mip_core.service.store import ServiceStore

    make_benchmark(str(work / "bench"), n_profiles=8, seed=0)
    bench = load_benchmark(str(work / "bench"))
    forget, retain, utility = pick_items(bench, 2 if args.dry_run else 8, 2 if args.dry_run else 4)
    # saved inside the store's folder, so registering it hard-links the shards instead of copying 16 GB
    staged = work / "store" / "incoming" / "base"
    model = stage("build", lambda: build_and_save(staged, device, args.dry_run))
    if model is None:
        return out
    out["model"] = model
    store = ServiceStore(str(work / "store"))
    base_uri = stage("register", lambda: store.uri(store.model_key("check", store.register_model(
        "check", str(staged), dataset_uri=str(work / "bench")))))
    if base_uri is None:
        return out
    shutil.rmtree(staged, ignore_errors=True)  # the version holds its own links (or copy) of the files
    res = stage("attribution", lambda: attribute(base_uri, bench, forget, device, mem, args.dry_run))
    if res is None:
        return out
    out["attribution"], graph = res
    from mip_core.entrypoints.edit import EditSpec, write_spec
    from mip_core.parquet_io import write_path_graph

    graph_uri = str(work / "path_graph")
    write_path_graph(graph, graph_uri)
    edited_uri = str(work / "store" / "batches" / "check" / "edited")
    spec = EditSpec(model_uri=base_uri, bench_uri=str(work / "bench"),
                    forget=[(it.item_id, f"req-{it.profile_id}") for it in forget],
                    retain_item_ids=[it.item_id for it in retain], graph_uri=graph_uri, output_uri=edited_uri,
                    edit={"rmisu": {"steps": 1, "batch_size": 2}}, lineage={"batch_id": "gpu-check"})
    spec_path = work / "edit" / "spec.json"
    write_spec(spec, str(spec_path))
    ed = stage("edit", lambda: edit(spec_path, "gpu" if cuda else "cpu", args.edit_timeout_s, cuda))
    if ed is None:
        return out
    ed["output"] = _files(Path(edited_uri))
    out["edit"] = ed
    sets = {"forget": forget, "retain": retain, "utility": utility}
    out["gate"] = stage("gate", lambda: gate(base_uri, edited_uri, bench, sets, device, mem))

    def publish() -> dict[str, Any]:
        t0 = time.perf_counter()
        version = store.register_model("check", edited_uri, dataset_uri=str(work / "bench"),
                                       lineage={"parent_version": "v0001", "batch_id": "gpu-check"})
        seconds = time.perf_counter() - t0
        folder = Path(store.uri(store.model_key("check", version)))
        return {"version": version, "seconds": round(seconds, 3), **_files(folder),
                "shards": len([p for p in folder.glob("*.safetensors") if not p.name.startswith("neuron-delta")]),
                "deltas": len(list(folder.glob("neuron-delta-*.safetensors")))}

    out["publish"] = stage("publish", publish)
    out["ok"] = not out["errors"] and all(out.get(k) for k in ("attribution", "edit", "gate", "publish"))
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_edit":
        return edit_job(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="the same path on CPU with a tiny shape (no GPU needed)")
    ap.add_argument("--work", help="working folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    ap.add_argument("--edit-timeout-s", type=float, default=300)
    args = ap.parse_args()
    import torch

    available = torch.cuda.is_available()
    where = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if available else ""
    print(f"gpu-check: torch {torch.__version__}, CUDA available: {available}{where}", flush=True)
    if not available and not args.dry_run:
        print(json.dumps({"schema": SCHEMA, "ok": False, "device": None,
                          "errors": {"cuda": "no CUDA device: this check needs one GPU (torch "
                                             f"{torch.__version__} sees none); run with --dry-run on CPU"}}))
        return 2
    out = run(args)
    print(json.dumps(out, default=str), flush=True)
    code = 0 if out["ok"] else 1
    if not args.dry_run and not args.no_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                               cwd=REPO)
        code = code or tests.returncode
    return code


if __name__ == "__main__":
    sys.exit(main())
