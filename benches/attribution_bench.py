"""Path-search throughput and storage (issue: attribution engine). Run by ``make bench``.

Measures, per tower, on the demo's model (``demo_out/vanilla`` if ``make demo`` ran, else a random model of the
same size; speed does not depend on the weights):
- items per second of ``attribute_items`` (m=4, k=5, 4 items per pass), one process, one thread;
- its time over a bare forward+backward of the same rows, repeated once per layer (the L x m rows the search
  needs): once with parameter gradients (a training step), once with activation gradients only;
- its speed-up over ``naive_attribution.naive_path`` (batch 1, one step per pass, parameter gradients on), and
  whether both choose the same neurons;
- stored bytes per item of the per-item path dataset and of the reduced path graph, against a dense bf16
  ``[L x d_mlp]`` tensor per item.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_attribution import naive_path  # noqa: E402

from mip_core.attribution import AttributionConfig, answer_logprob, attribute_items, frozen  # noqa: E402
from mip_core.benchmark import load_benchmark, make_benchmark  # noqa: E402
from mip_core.modeling import build_tiny, collate, encode, load_model  # noqa: E402
from mip_core.paths import reduce_paths  # noqa: E402
from mip_core.results import write_item_paths, write_path_graph  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


def bare_seconds(model, adapter, examples, cfg, pad_id, param_grads: bool) -> float:
    """L x (forward + backward) over the same B*m rows, the work the path search cannot avoid."""
    layers = len(adapter.sites("vision" if "pixel_values" in examples[0] else "language"))
    t0 = time.perf_counter()
    for start in range(0, len(examples), cfg.batch_items):
        copies = [dict(e) for e in examples[start:start + cfg.batch_items] for _ in range(cfg.steps)]
        batch = collate(copies, pad_id)
        labels = batch.pop("labels")
        for _ in range(layers):
            if param_grads:
                for p in model.parameters():
                    p.requires_grad_(True)
                model.zero_grad(set_to_none=True)
                answer_logprob(model(**batch, use_cache=False).logits, labels).sum().backward()
            else:
                with frozen(model):
                    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
                    out = model(**{k: v for k, v in batch.items() if k != "input_ids"}, inputs_embeds=embeds,
                                use_cache=False)
                    torch.autograd.grad(answer_logprob(out.logits, labels).sum(), embeds)
    for p in model.parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo_out/vanilla")
    parser.add_argument("--bench", default="demo_out/bench")
    parser.add_argument("--items", type=int, default=16, help="items per tower for the library timing")
    parser.add_argument("--naive-items", type=int, default=4, help="items per tower for the naive timing")
    parser.add_argument("--json", default="benches/results/attribution.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    if Path(args.model, "model.safetensors").is_file():
        loaded = load_model(args.model)
        model, processor, adapter, model_desc = loaded.model, loaded.processor, loaded.adapter, args.model
    else:
        from mip_core.adapters import get_adapter

        model, processor = build_tiny("qwen2_5_vl", size="demo")
        adapter, model_desc = get_adapter(model), "random qwen2_5_vl (demo size)"
    bench_dir = args.bench if Path(args.bench, "manifest.json").is_file() else str(tmp / "bench")
    if bench_dir != args.bench:
        make_benchmark(bench_dir, 100, 0)
    bench = load_benchmark(bench_dir)
    cfg = AttributionConfig(steps=4, top_k=5, batch_items=4)
    pad_id = processor.tokenizer.pad_token_id
    results: dict[str, object] = {"model": model_desc, "machine": f"{platform.processor() or platform.machine()}, "
                                  f"{torch.get_num_threads()} torch thread", "torch": torch.__version__,
                                  "config": {"steps": cfg.steps, "top_k": cfg.top_k, "batch_items": cfg.batch_items}}
    for tower, modality in (("language", "text"), ("vision", "multimodal")):
        items = bench.split_items("retain", forget_pct=10, modality=modality)[: args.items]
        attribute_items(model, adapter, processor, bench, items[:cfg.batch_items], cfg)  # warm-up
        t0 = time.perf_counter()
        paths, failures = attribute_items(model, adapter, processor, bench, items, cfg)
        lib = time.perf_counter() - t0
        assert not failures, failures
        examples = [encode(processor, it.question, bench.load_image(it) if it.image else None, it.answer)
                    for it in items]
        bare_param = bare_seconds(model, adapter, examples, cfg, pad_id, param_grads=True)
        bare_act = bare_seconds(model, adapter, examples, cfg, pad_id, param_grads=False)
        naive_times, agree = [], 0
        for ex, path in list(zip(examples, paths, strict=True))[: args.naive_items]:
            t0 = time.perf_counter()
            ref = naive_path(model, adapter, ex, tower, cfg.steps, cfg.top_k, pad_id)
            naive_times.append(time.perf_counter() - t0)
            got = [[n.neuron for n in path.nodes if n.layer == layer] for layer in range(len(ref))]
            agree += got == [[n.neuron for n in layer_nodes] for layer_nodes in ref]
        sites = adapter.sites(tower)
        ds = write_item_paths(paths, str(tmp / f"{tower}_items"), run_id="bench")
        graph = reduce_paths(paths, run_id="bench")
        write_path_graph(graph, str(tmp / f"{tower}_graph"))
        per_item = lib / len(items)
        results[tower] = {
            "items": len(items), "layers": len(sites), "d_mlp": sites[0].d_mlp,
            "items_per_s": len(items) / lib,
            "ratio_to_bare_fwd_bwd_param_grads": lib / bare_param,
            "ratio_to_bare_fwd_bwd_activation_grads": lib / bare_act,
            "naive_s_per_item": statistics.mean(naive_times), "library_s_per_item": per_item,
            "speedup_over_naive": statistics.mean(naive_times) / per_item,
            "naive_same_neurons": f"{agree}/{len(naive_times)}",
            "item_paths_bytes_per_item": dir_bytes(tmp / f"{tower}_items") / len(items),
            "graph_bytes_per_item": dir_bytes(tmp / f"{tower}_graph") / len(items),
            "dense_bf16_bytes_per_item": len(sites) * sites[0].d_mlp * 2, "rows": ds.n_rows,
        }
        print(json.dumps({tower: results[tower]}, indent=1), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
