"""``mip``: the command-line entry point. Each command parses flags and calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any
from datetime import timezone

from mip_core.errors import InputError, MipError


def _model_tiny(args: argparse.Namespace) -> None:
    from mip_core.modeling import build_tiny, save_model

    model, processor = build_tiny(args.arch, size=args.size, seed=args.seed)
    save_model(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random {args.arch} ({args.size}, {n / 1e6:.2f} M parameters) to {args.out}")


def _benchmark_make(args: argparse.Namespace) -> None:
    from mip_core.benchmark import make_benchmark

    manifest = make_benchmark(args.out, args.profiles, args.seed, image_size=args.image_size)
    print(f"wrote benchmark {args.out}: {manifest.n_profiles} profiles, seed {manifest.seed}, "
          f"counts {json.dumps(manifest.counts, sort_keys=True)}")


def _benchmark_export(args: argparse.Namespace) -> None:
    from mip_core.service.keepsets import export_benchmark

    written = export_benchmark(args.bench, args.out)
    for kind in ("retain", "utility", "templates"):
        with open(written[kind], encoding="utf-8") as f:
            print(f"wrote {written[kind]}: {sum(1 for line in f if line.strip())} rows")
    print(f"wrote {written['images']}: {len(os.listdir(written['images']))} images; register a model with them: "
          f"mip models register --name NAME --model DIR --retain {written['retain']} --utility "
          f"{written['utility']} --templates {written['templates']}")


def _vanilla(args: argparse.Namespace) -> None:
    import torch

    from mip_core.benchmark import load_benchmark
    from mip_core.modeling import build_tiny, load_model
    from mip_core.training import TrainConfig, save_trained, train

    torch.set_num_threads(args.threads)
    bench = load_benchmark(args.bench)
    if args.init:
        loaded = load_model(args.init)
        model, processor = loaded.model, loaded.processor
    else:
        model, processor = build_tiny(args.arch, size=args.size, seed=args.seed)
    cfg = TrainConfig(steps=args.steps, max_minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, threads=args.threads, probe_every=args.probe_every,
                      identity_warmup_steps=args.identity_warmup, exclude_profiles=_excluded_people(args, bench))
    if cfg.exclude_profiles:
        print(f"leaving {len(cfg.exclude_profiles)} people out of training (a gold reference for unlearning them): "
              f"{', '.join(cfg.exclude_profiles)}")
    log = train(model, processor, bench, cfg, log=lambda line: print(line, flush=True))
    save_trained(model, processor, log, args.out, size=None if args.init else args.size)
    print(f"trained {log.steps_done} steps in {log.seconds:.0f}s; wrote {args.out}")


def _excluded_people(args: argparse.Namespace, bench: Any) -> tuple[str, ...]:
    """``--exclude`` ids, or the people of forget subset ``--forget-seed`` at ``--exclude-forget`` percent."""
    if args.exclude and args.exclude_forget is not None:
        raise InputError("--exclude and --exclude-forget exclude each other: name the people, or a forget subset")
    if args.exclude_forget is not None:
        return tuple(sorted(bench.with_forget_seed(args.forget_seed).forget_profile_ids(args.exclude_forget)))
    return tuple(sorted({p for part in args.exclude or [] for p in part.split(",") if p}))


def _eval(args: argparse.Namespace) -> None:
    import torch

    from mip_core.benchmark import load_benchmark
    from mip_core.evaluation import evaluate, format_table, read_json, write_json
    from mip_core.modeling import load_model

    torch.set_num_threads(args.threads)
    reference = read_json(args.reference) if args.reference else None
    bench = load_benchmark(args.bench)
    loaded = load_model(args.model)
    t0 = time.perf_counter()
    rows = evaluate(loaded.model, loaded.processor, bench, forget_pct=args.forget, splits=args.splits,
                    reference=reference, batch_size=args.batch_size, progress=sys.stderr.isatty())
    print(f"model {args.model} on {args.bench} (forget {args.forget} %), {time.perf_counter() - t0:.0f}s")
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")


def _attribute(args: argparse.Namespace) -> int:
    import torch

    from mip_core.attribution import AttributionConfig, attribute_items
    from mip_core.benchmark import load_benchmark
    from mip_core.modeling import load_model
    from mip_core.parquet_io import write_item_paths

    torch.set_num_threads(args.threads)
    bench = load_benchmark(args.bench)
    items = bench.split_items(args.split, forget_pct=args.forget, modality=args.modality)
    if args.items:
        wanted = [i for i in args.items.split(",") if i]
        known = {it.item_id: it for it in items}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise InputError(f"--items: {', '.join(unknown)} not in split {args.split!r} (forget {args.forget} %); "
                             f"item ids are the item_id column of {args.bench}/items.parquet; fix or drop --items")
        items = [known[i] for i in wanted]
    try:
        cfg = AttributionConfig(steps=args.steps, top_k=args.top_k, batch_items=args.batch_items, rule=args.rule)
    except ValueError as exc:  # names the field; the flag is its name with dashes
        raise InputError(f"{exc}; fix --steps / --top-k / --batch-items / --rule") from None
    loaded = load_model(args.model)
    request_ids = {it.item_id: args.request_id for it in items} if args.request_id else None
    t0 = time.perf_counter()
    paths, failures = attribute_items(loaded.model, loaded.adapter, loaded.processor, bench, items, cfg,
                                      request_ids=request_ids)
    seconds = time.perf_counter() - t0
    ref = write_item_paths(paths, args.out, run_id=args.run_id)
    print(f"attributed {len(paths)} of {len(items)} items in {seconds:.1f}s "
          f"({len(paths) / max(seconds, 1e-9):.2f} items/s); wrote {ref.n_rows} rows to {ref.uri}")
    for failure in failures:
        print(f"mip: item {failure.item_id} failed: {failure.reason}", file=sys.stderr)
    return 1 if failures else 0


def _paths_reduce(args: argparse.Namespace) -> None:
    from mip_core.path_graph import reduce_paths
    from mip_core.parquet_io import read_item_paths, write_path_graph

    graph = reduce_paths(read_item_paths(args.inputs), run_id=args.run_id)
    ref = write_path_graph(graph, args.out)
    print(f"reduced {len(args.inputs)} input(s) to {ref.n_rows} neurons; wrote {ref.uri}")


def _paths_show(args: argparse.Namespace) -> None:
    from mip_core.path_graph import summarize
    from mip_core.parquet_io import read_path_graph

    print(summarize(read_path_graph(args.uri), top=args.top))


def _edit_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Edit flags given on the command line, as overrides of the chosen method's own settings."""
    rmisu = {k: getattr(args, k) for k in ("layer", "target_scale", "retain_weight", "retain_ce_weight", "steps",
                                           "lr", "batch_size", "target_per", "check_every", "check",
                                           "after_forgotten", "plausible_weight")
             if getattr(args, k, None) is not None}
    edit = {k: getattr(args, k) for k in ("prune", "per_request") if getattr(args, k, None) is not None}
    return {**edit, "rmisu": rmisu} if rmisu else edit


def _unlearn(args: argparse.Namespace) -> None:
    import torch

    from mip_core.attribution import AttributionConfig
    from mip_core.benchmark import load_benchmark
    from mip_core.editing.unlearn import save_unlearned, unlearn_benchmark
    from mip_core.modeling import load_model
    from mip_core.parquet_io import read_path_graph

    torch.set_num_threads(args.threads)
    graph = read_path_graph(args.paths) if args.paths else None  # before the model: fail fast on a bad URI
    bench = load_benchmark(args.bench)
    loaded = load_model(args.model)
    t0 = time.perf_counter()
    summary, graph = unlearn_benchmark(
        loaded, bench, args.method, forget_pct=args.forget, seed=args.subset, graph=graph,
        edit=_edit_overrides(args), attribution=AttributionConfig(top_k=args.top_k),
        log=lambda line: print(line, flush=True))
    lineage = {"model": args.model, "bench": args.bench, "forget_pct": args.forget, "subset": args.subset,
               "paths": args.paths or (graph.run_id if graph is not None else None)}
    save_unlearned(loaded, summary, args.out, lineage=lineage)
    print(f"{args.method}: edited {summary.trainable_parameters} parameters in {time.perf_counter() - t0:.0f}s; "
          f"wrote {args.out}")


def _compare(args: argparse.Namespace) -> None:
    import json as json_

    import torch

    from mip_core.attribution import AttributionConfig
    from mip_core.benchmark import load_benchmark
    from mip_core.compare import (
        DEFAULT_METHODS,
        CompareConfig,
        compare,
        format_compare,
        format_paired,
        plot,
        summarize,
        to_json,
    )
    from mip_core.modeling import load_model
    from mip_core.storage import filesystem

    torch.set_num_threads(args.threads)
    methods = DEFAULT_METHODS if args.methods == ["all"] else tuple(
        m for part in args.methods for m in part.split(",") if m)
    cfg = CompareConfig(forget_pct=args.forget, methods=tuple(methods), seeds=args.seeds,
                        attribution=AttributionConfig(top_k=args.top_k), edit=_edit_overrides(args),
                        holdout_profiles=args.holdout, gold=tuple(args.gold or ()))
    bench = load_benchmark(args.bench)
    loaded = load_model(args.model)
    t0 = time.perf_counter()
    rows = compare(loaded, bench, cfg, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - t0
    summary = summarize(rows)
    print(f"\n{len(methods)} methods x {args.seeds} forget subset(s) of {args.forget} % on {args.bench}, "
          f"{seconds:.0f}s\n")
    print(format_compare(summary))
    if args.json:
        fs, path = filesystem(args.json)
        with fs.open(path, "w") as f:
            f.write(json_.dumps(to_json(rows, cfg, {"model": args.model, "bench": args.bench,
                                                    "seconds": round(seconds, 1)}), indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(summary, args.plot)
        print(f"wrote {args.plot}")
    print(format_paired(rows, "mip", [m for m in methods if m != "mip"]))  # after the files: never lose a run


def _service_root(args: argparse.Namespace) -> str:
    return args.root or os.environ.get("MIP_ROOT") or "./mip_store"


def _submit(args: argparse.Namespace) -> None:
    from mip_core.service.requests import parse_request
    from mip_core.service.store import ServiceStore

    try:
        if args.file == "-":
            stdin = getattr(sys.stdin, "buffer", None)  # a text-only stdin (a test's StringIO) has no bytes
            raw = stdin.read() if stdin is not None else sys.stdin.read().encode()
        else:
            with open(args.file, "rb") as f:
                raw = f.read()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise InputError(f"cannot read request file {args.file!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"request file {args.file!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "a request is a JSON document, see examples/requests/") from None
    request = parse_request(text)  # before touching the store: an invalid request leaves the queue unchanged
    store = ServiceStore(_service_root(args))
    store.check_target(request)
    record = store.submit(request, base_dir=None if args.file == "-"  # relative image paths: beside the file
                          else os.path.dirname(os.path.abspath(args.file)))
    print(f"queued {record.request_id} ({record.request.target_model}, "
          f"{len(request.subjects)} subject(s), {len(request.items)} item(s)): {store.record_uri(record)}")


def _requests(args: argparse.Namespace) -> None:
    from mip_core.service.requests import subject_label
    from mip_core.service.store import ServiceStore

    records = ServiceStore(_service_root(args)).list(state=args.state, target_model=args.model)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=1))
        return
    for r in records:
        what = ",".join(map(subject_label, r.request.subjects)) or "-"
        extra = " ".join(f"{k}={v}" for k, v in (("batch", r.batch_id), ("version", r.model_version),
                                                  ("reason", r.reason)) if v)
        submitted = r.submitted_at.astimezone(timezone.utc)
        print(f"{r.request_id}\t{r.state}\t{submitted:%Y-%m-%dT%H:%M:%SZ}\t{r.request.target_model}\t"
              f"subjects={what} items={len(r.request.items)}" + (f"\t{extra}" if extra else ""))
    if not records:
        print("no requests" + (f" in state {args.state}" if args.state else ""), file=sys.stderr)


def _status(args: argparse.Namespace) -> None:
    """One request's trace from submission to its terminal state, or a summary of the whole queue."""
    from mip_core.service.requests import STATES
    from mip_core.service.runs import batch_owner_state
    from mip_core.service.store import ServiceStore

    store = ServiceStore(_service_root(args))
    if args.request_id:
        record = store.get(args.request_id)
        data = record.model_dump(mode="json")  # timestamps as ISO 8601
        trace = {"request_id": record.request_id, "state": record.state,
                 "target_model": record.request.target_model,
                 **{k: data[k] for k in ("submitted_at", "claimed_at", "finished_at", "batch_id", "model_version",
                                         "reason")},
                 "report": record.report_uri, "metrics": record.metrics, "record": store.record_uri(record)}
        if args.json:
            print(json.dumps(trace, indent=1))
            return
        for key, value in trace.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v:.3g}" for k, v in value.items())
            if value is not None:
                print(f"{key + ':':15s}{value}")
        return
    records = store.list()
    counts = {model: dict.fromkeys(STATES, 0) for model in sorted({r.request.target_model for r in records})}
    claimed: dict[str, int] = {}  # batch id -> its requests still claimed (a run that may have died)
    for r in records:
        counts[r.request.target_model][r.state] += 1
        if r.state == "claimed":
            claimed[str(r.batch_id)] = claimed.get(str(r.batch_id), 0) + 1
    oldest = min((r.submitted_at for r in records if r.state == "pending"), default=None)
    owners = {batch: batch_owner_state(store, batch) for batch in sorted(claimed)}
    if args.json:
        print(json.dumps({"root": store.root, "by_model": counts, "total": len(records),
                          "oldest_pending": oldest.isoformat() if oldest else None,
                          "claimed_batches": {b: {"claimed": n, **owners[b]} for b, n in sorted(claimed.items())}},
                         indent=1))
        return
    print(f"store {store.root}: {len(records)} request(s)")
    print("model\t" + "\t".join(STATES))
    for model, row in counts.items():
        print(model + "\t" + "\t".join(str(row[s]) for s in STATES))
    if oldest is not None:
        print(f"oldest pending: submitted {oldest.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    for batch, n in sorted(claimed.items()):
        owner = owners[batch]
        print(f"batch {batch}: {n} claimed request(s); " + (
            f"run {owner['owner']} is processing it (lease renewed until {owner['expires_at']})" if owner["alive"]
            else f"its run ({owner['owner'] or 'unknown'}) is gone and it {owner['abandon']}: the next nightly "
                 "run closes its requests failed" if owner["abandon"]
            else f"its run ({owner['owner'] or 'unknown'}) is gone: the next nightly run resumes it, or now: "
                 f"the unlearn-batch deployment with batch_id={batch}"))


def _models_register(args: argparse.Namespace) -> None:
    from mip_core.service.registry import check_sources, register_with_keepsets
    from mip_core.service.store import ServiceStore

    keep = {"--retain": args.retain, "--utility": args.utility, "--templates": args.templates}
    given = [flag for flag, value in keep.items() if value is not None]
    usage = ("give --dataset BENCH (the benchmark the model was trained on) or --retain R --utility U "
             "[--templates T] (your own keep-set files, docs/keepsets.md; `mip benchmark export` shows examples)")
    if args.dataset is not None and given:
        raise InputError(f"--dataset and {', '.join(given)} exclude each other: {usage}")
    if args.dataset is None and (args.retain is None or args.utility is None):
        missing = [f for f in ("--retain", "--utility") if keep[f] is None]
        raise InputError(f"{' and '.join(missing)} missing: {usage}" if given else f"no dataset: {usage}")
    store = ServiceStore(_service_root(args))
    if args.dataset is not None:
        model_uri, dataset_uri = check_sources(args.model, args.dataset, store.endpoint_url)
        version = store.register_model(args.name, model_uri, dataset_uri=dataset_uri)
    else:
        version = register_with_keepsets(store, args.name, args.model, args.retain, args.utility, args.templates)
    print(f"registered {args.name} {version} (current): {store.uri(store.model_key(args.name, version))}")
    for kind, uri in (store.model_info(args.name, version).get("keepsets") or {}).items():
        print(f"  keep-set {kind}: {uri}")


def _models_export(args: argparse.Namespace) -> None:
    from mip_core.modeling.deltas import export_plain
    from mip_core.modeling.io import localize
    from mip_core.service.store import ServiceStore

    store = ServiceStore(_service_root(args))
    version = args.version or store.current_version(args.name)
    if version is None or version not in store.versions(args.name):
        raise InputError(f"--version {args.version}: model {args.name!r} has versions {store.versions(args.name)}; "
                         "list them with `mip models list`")
    local = localize(store.uri(store.model_key(args.name, version)), store.endpoint_url)
    done = export_plain(local, args.out)
    print(f"exported {args.name} {version} to {args.out}: {len(done.get('rewritten', []))} shard(s) written with "
          f"the edits applied, {len(done.get('link', [])) + len(done.get('copy', []))} file(s) linked or copied; "
          f"load it with from_pretrained({args.out!r})")


def _models_list(args: argparse.Namespace) -> None:
    from mip_core.service.store import ServiceStore

    store = ServiceStore(_service_root(args))
    rows = [store.model_info(name, version) | {"current": version == store.current_version(name)}
            for name in store.models() for version in store.versions(name)]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return
    for r in rows:
        print(f"{r['name']}\t{r['version']}{' (current)' if r['current'] else ''}\tparent={r.get('parent_version')}"
              f"\tbatch={r.get('batch_id') or '-'}\trequests={len(r.get('requests') or [])}\t{r['uri']}")
    if not rows:
        print("no models registered; add one with `mip models register`", file=sys.stderr)


def _report(args: argparse.Namespace) -> None:
    from mip_core.service.links import report_link, report_server, serve_url
    from mip_core.service.store import ServiceStore

    store = ServiceStore(_service_root(args))
    if args.serve:
        _serve_reports(store, report_server, serve_url())
        return
    if args.batch_id is None:
        raise InputError("BATCH_ID is required (or --serve to serve every batch's report)")
    key, html_key = store.batch_key(args.batch_id, "report.md"), store.batch_key(args.batch_id, "report.html")
    if not store.exists(key):
        raise InputError(f"batch {args.batch_id!r} has no report in {store.uri()}; list batches with "
                         f"`mip requests --json` (field batch_id), or check --root")
    link = report_link(store, args.batch_id) if store.exists(html_key) else None
    if args.json:
        gate_key = store.batch_key(args.batch_id, "gate.json")
        print(json.dumps({"batch_id": args.batch_id, "report": store.uri(key),
                          "html": store.uri(html_key) if link else None, "link": link.url if link else None,
                          "link_expires_at": link.expires_at if link else None,
                          "gate": store.read_json(gate_key) if store.exists(gate_key) else None}, indent=1))
        return
    if args.open:
        if link is None:
            raise InputError(f"batch {args.batch_id!r} has no HTML report (batches closed before this release "
                             f"have only {store.uri(key)})")
        print(f"{link.url}\n({link.how})")
        return
    sys.stdout.write(store.read_text(key))
    print(f"\nreport: {store.uri(key)}" + (f"\nhtml:   {link.url} ({link.how})" if link else ""))


def _serve_reports(store: Any, make_server: Any, url: str) -> None:
    """``mip report --serve``: serve the batch reports on 127.0.0.1 until Ctrl-C."""
    from urllib.parse import urlsplit

    where = urlsplit(url)
    server = make_server(store, where.hostname or "127.0.0.1", where.port or 8765)
    print(f"serving the batch reports of {store.root} at {url}/batches/<batch id>/report.html (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _schema(args: argparse.Namespace) -> None:
    from mip_core.service.requests import schema_text

    sys.stdout.write(schema_text())


def _add_model_bench_forget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or URI (the vanilla model)")
    p.add_argument("--bench", required=True, help="benchmark folder")
    p.add_argument("--forget", type=int, default=5, choices=(5, 10, 15), help="forget split, in %% of profiles")


def _add_edit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("edit (MIP-Editor, random, rmu, ablations); defaults: mip_core/editing/rmisu.py")
    g.add_argument("--layer", type=int, help="RMisU language layer l (default: the method's; mip: 75%% of the depth)")
    g.add_argument("--target-scale", type=float, help="lambda: target norm / frozen hidden-state norm")
    g.add_argument("--retain-weight", type=float, help="gamma: weight of the retain representation term")
    g.add_argument("--retain-ce-weight", type=float, help="weight of a retain cross-entropy term (0: off)")
    g.add_argument("--plausible-weight", type=float, help="weight of the term keeping a forget question's wrong "
                   "options as likely as before the edit (0: off)")
    g.add_argument("--steps", type=int, help="RMisU optimiser steps")
    g.add_argument("--lr", type=float, help="RMisU learning rate")
    g.add_argument("--batch-size", type=int, help="forget (and retain) inputs per RMisU step")
    g.add_argument("--check-every", type=int, metavar="N", help="every N RMisU steps, check whether the forget "
                   "items are forgotten (see --check; 0: the whole budget)")
    g.add_argument("--check", choices=("said", "choice"), help="what a check measures: 'said', no forget answer "
                   "is said by greedy decoding; 'choice', multiple choice no better than chance, per modality")
    g.add_argument("--after-forgotten", choices=("stop", "repair"), help="with --check-every, once forgotten: "
                   "stop, or spend the rest of the budget on the retain terms")
    g.add_argument("--target-per", choices=("input", "request"),
                   help="one RMisU target direction per forget input or per request (default: the method's)")
    g.add_argument("--prune", action=argparse.BooleanOptionalAction, default=None,
                   help="zero the path neurons before RMisU (default: the method's)")
    g.add_argument("--per-request", action=argparse.BooleanOptionalAction, default=None,
                   help="one edit per request on its own paths, instead of one on the batch's union")
    g.add_argument("--top-k", type=int, default=5, help="attribution: neurons kept per item and layer (default 5)")


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=int(os.environ.get("MIP_THREADS", "1")),
                   help="torch threads (default 1, or $MIP_THREADS): 1 is fastest on a shared 2-core machine")


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    from mip_core.adapters import ARCHITECTURES as ADAPTERS
    from mip_core.adapters import TINY_SIZE_NAMES as TINY_SIZES

    model = sub.add_parser("model", help="build models").add_subparsers(dest="model_command", required=True,
                                                                        metavar="SUBCOMMAND")
    tiny = model.add_parser("tiny", help="build a tiny random model with a locally trained tokenizer and processor")
    tiny.add_argument("--arch", required=True, choices=sorted(ADAPTERS))
    tiny.add_argument("--out", required=True, help="output folder or fsspec URI (s3://bucket/prefix)")
    tiny.add_argument("--size", default="demo", choices=sorted(TINY_SIZES))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_model_tiny)


def _add_benchmark_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("benchmark", help="synthetic forget benchmark").add_subparsers(
        dest="benchmark_command", required=True, metavar="SUBCOMMAND")
    make = bench.add_parser("make", help="generate the fictitious-profile benchmark (same seed, same bytes)")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--profiles", type=int, default=100, help="number of fictitious people (default 100)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    make.set_defaults(func=_benchmark_make)
    bexp = bench.add_parser("export", help="write a benchmark as plain keep-set files (retain.jsonl, "
                                           "utility.jsonl, templates.jsonl, images/): what an operator registers "
                                           "a model with")
    bexp.add_argument("--bench", required=True, help="benchmark folder")
    bexp.add_argument("--out", required=True, help="output folder (created)")
    bexp.set_defaults(func=_benchmark_export)


def _add_vanilla_command(sub: argparse._SubParsersAction) -> None:
    from mip_core.adapters import ARCHITECTURES as ADAPTERS
    from mip_core.adapters import DEFAULT_ARCH
    from mip_core.adapters import TINY_SIZE_NAMES as TINY_SIZES

    vanilla = sub.add_parser("vanilla", help="fine-tune a model on every profile and the utility set")
    vanilla.add_argument("--bench", required=True, help="benchmark folder")
    vanilla.add_argument("--arch", default=DEFAULT_ARCH, choices=sorted(ADAPTERS),
                         help="architecture of the tiny model to build (ignored with --init)")
    vanilla.add_argument("--size", default="demo", choices=sorted(TINY_SIZES))
    vanilla.add_argument("--init", help="start from this model folder/URI instead of a random tiny model")
    vanilla.add_argument("--out", required=True, help="output folder or URI")
    vanilla.add_argument("--steps", type=int, default=7000)
    vanilla.add_argument("--minutes", type=float, default=15.0, help="training time budget (default 15)")
    vanilla.add_argument("--batch-size", type=int, default=16)
    vanilla.add_argument("--lr", type=float, default=3e-3)
    vanilla.add_argument("--identity-warmup", type=int, default=1500,
                         help="first steps that oversample 'who is in the image' items (default 1500)")
    vanilla.add_argument("--probe-every", type=int, default=250, help="steps between learning-curve points")
    vanilla.add_argument("--seed", type=int, default=0)
    gold = vanilla.add_argument_group("gold reference (exact unlearning: train without the people to forget)")
    gold.add_argument("--exclude", nargs="+", metavar="PROFILE_ID", help="leave these people out of training")
    gold.add_argument("--exclude-forget", type=int, metavar="PCT", help="leave out the people `mip compare "
                      "--forget PCT` forgets (with --forget-seed: which subset); pass the model to compare --gold")
    gold.add_argument("--forget-seed", type=int, default=0, help="forget subset for --exclude-forget (default 0)")
    _add_threads_flag(vanilla)
    vanilla.set_defaults(func=_vanilla)


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    from mip_core.names import SPLITS

    ev = sub.add_parser("eval", help="evaluate a model: MC accuracy and ROUGE-L per split and modality")
    ev.add_argument("--model", required=True, help="model folder or URI")
    ev.add_argument("--bench", required=True, help="benchmark folder")
    ev.add_argument("--forget", type=int, default=5, choices=(5, 10, 15), help="forget split, in %% of profiles")
    ev.add_argument("--reference", help="a `--json` evaluation of the model before unlearning: adds forgetting "
                                        "rate and retention")
    ev.add_argument("--json", help="write tidy result rows to this file")
    ev.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    ev.add_argument("--batch-size", type=int, default=64)
    _add_threads_flag(ev)
    ev.set_defaults(func=_eval)


def _add_attribute_command(sub: argparse._SubParsersAction) -> None:
    from mip_core.names import SPLITS

    att = sub.add_parser("attribute", help="influential neuron paths of benchmark items (IGI text, IFI vision)")
    att.add_argument("--model", required=True, help="model folder or URI")
    att.add_argument("--bench", required=True, help="benchmark folder")
    att.add_argument("--split", default="forget", choices=SPLITS)
    att.add_argument("--forget", type=int, default=5, choices=(5, 10, 15), help="forget split, in %% of profiles")
    att.add_argument("--modality", choices=("multimodal", "text"),
                     help="only this modality (multimodal items go to the vision tower, text items to the LLM)")
    att.add_argument("--items", help="comma-separated item ids (default: the whole split)")
    att.add_argument("--steps", type=int, default=4, help="interpolation copies m, the rule's nodes (default 4)")
    att.add_argument("--rule", default="right",
                     help="quadrature rule placing the m copies on [0, 1]: right (default, the paper's Riemann sum), "
                          "gauss_legendre or log_trapezoid (docs/attribution.md); "
                          "gauss_legendre --steps 2 --batch-items 16 is the fast setting of BENCHMARKS.md)")
    att.add_argument("--top-k", type=int, default=5, help="neurons kept per layer (default 5)")
    att.add_argument("--batch-items", type=int, default=4, help="items per forward/backward (x steps rows)")
    att.add_argument("--request-id", help="forget-request id recorded on every path (lineage)")
    att.add_argument("--run-id", default="cli", help="run id stored in every row")
    att.add_argument("--out", required=True, help="output dataset: folder or URI (s3://bucket/prefix)")
    _add_threads_flag(att)
    att.set_defaults(func=_attribute)


def _add_paths_commands(sub: argparse._SubParsersAction) -> None:
    paths = sub.add_parser("paths", help="path graphs").add_subparsers(dest="paths_command", required=True,
                                                                       metavar="SUBCOMMAND")
    reduce = paths.add_parser("reduce", help="reduce per-item paths into one global path graph")
    reduce.add_argument("inputs", nargs="+", metavar="IN_URI", help="per-item path datasets (mip attribute --out)")
    reduce.add_argument("--out", required=True, help="output dataset: folder or URI")
    reduce.add_argument("--run-id", default="cli", help="run id stored in every row")
    reduce.set_defaults(func=_paths_reduce)
    show = paths.add_parser("show", help="print a path graph per tower and layer: union size, top neurons, support")
    show.add_argument("uri", help="path graph dataset (mip paths reduce --out)")
    show.add_argument("--top", type=int, default=5, help="neurons listed per layer (default 5)")
    show.set_defaults(func=_paths_show)


def _add_method_commands(sub: argparse._SubParsersAction) -> None:
    """`unlearn` runs one method, `compare` all of them; both take the same edit flags."""
    from mip_core.editing import METHOD_NAMES as METHODS

    unl = sub.add_parser("unlearn", help="make a model forget a benchmark forget split with one method")
    _add_model_bench_forget(unl)
    unl.add_argument("--subset", type=int, default=0, help="forget subset (0: the benchmark's own; s>0: re-drawn)")
    unl.add_argument("--method", default="mip", choices=list(METHODS), help="unlearning method (default mip)")
    unl.add_argument("--paths", help="path graph URI (mip paths reduce); default: attribute the forget split")
    unl.add_argument("--out", required=True, help="output model folder or URI")
    _add_threads_flag(unl)
    _add_edit_flags(unl)
    unl.set_defaults(func=_unlearn)

    cmp_ = sub.add_parser("compare", help="run every method from the same vanilla model and compare them")
    _add_model_bench_forget(cmp_)
    cmp_.add_argument("--methods", nargs="+", default=["all"],
                      help=f"'all' or names (space or comma separated): {', '.join(METHODS)}")
    cmp_.add_argument("--seeds", type=int, default=1, help="forget subsets to repeat over (mean +- std)")
    cmp_.add_argument("--holdout", type=int, default=10, help="never-seen profiles for the MIA AUC (default 10)")
    cmp_.add_argument("--gold", nargs="+", metavar="MODEL", help="one gold model per forget subset (trained "
                      "without its people: mip vanilla --exclude-forget PCT --forget-seed K); adds each method's "
                      "distance to it and the privacy leak")
    cmp_.add_argument("--json", help="write tidy rows (+ method, seed) and the mean/std summary here")
    cmp_.add_argument("--plot", help="write the forgetting-vs-retention scatter plot (PNG) here")
    _add_threads_flag(cmp_)
    _add_edit_flags(cmp_)
    cmp_.set_defaults(func=_compare)


_ROOT_HELP = "service store: folder or s3://bucket/prefix (default: $MIP_ROOT, else ./mip_store)"


def _add_request_commands(sub: argparse._SubParsersAction) -> None:
    from mip_core.names import STATES

    sub_ = sub.add_parser("submit", help="validate a forget request (JSON) and queue it for the nightly run")
    sub_.add_argument("file", metavar="FILE",
                      help="request JSON file, or - for stdin (schema: mip schema request)")
    sub_.add_argument("--root", help=_ROOT_HELP)
    sub_.set_defaults(func=_submit)
    req = sub.add_parser("requests", help="list queued and finished forget requests, oldest first")
    req.add_argument("--root", help=_ROOT_HELP)
    req.add_argument("--state", choices=STATES, help="only this state")
    req.add_argument("--model", help="only requests for this target model")
    req.add_argument("--json", action="store_true", help="print the full records as JSON")
    req.set_defaults(func=_requests)
    st = sub.add_parser("status", help="where a request is (state, times, batch, model version, reason), or a "
                                       "summary of the queue")
    st.add_argument("request_id", nargs="?", metavar="REQUEST_ID", help="one request (default: the whole queue)")
    st.add_argument("--root", help=_ROOT_HELP)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_status)


def _add_models_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the service's model registry").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND")
    reg = models.add_parser("register", help="copy a model folder into the store as the next version of NAME and "
                                             "make it current")
    reg.add_argument("--name", required=True, help="model name requests target (letters, digits, . _ -)")
    reg.add_argument("--model", required=True, help="model folder or URI (safetensors + processor)")
    reg.add_argument("--dataset", help="the benchmark folder or URI the model was trained on (or give --retain "
                                       "and --utility instead)")
    reg.add_argument("--retain", help="keep-set file (JSONL or Parquet, docs/keepsets.md): facts about people the "
                                      "model must keep knowing")
    reg.add_argument("--utility", help="keep-set file: general questions the model must keep answering")
    reg.add_argument("--templates", help="question templates (JSONL) to probe a person with (default: a general "
                                         "set: who is this, birthplace, job, home, employer, known for)")
    reg.add_argument("--root", help=_ROOT_HELP)
    reg.set_defaults(func=_models_register)
    exp = models.add_parser("export", help="write a version as a plain checkpoint for serving (a neuron-delta "
                                           "version gets its edits applied; docs/scale.md)")
    exp.add_argument("name", metavar="NAME")
    exp.add_argument("--version", help="default: the current version")
    exp.add_argument("--out", required=True, help="a local folder (created)")
    exp.add_argument("--root", help=_ROOT_HELP)
    exp.set_defaults(func=_models_export)
    mls = models.add_parser("list", help="every version of every model, with its lineage")
    mls.add_argument("--root", help=_ROOT_HELP)
    mls.add_argument("--json", action="store_true", help="print the lineage records as JSON")
    mls.set_defaults(func=_models_list)


def _add_report_commands(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="print a batch's report (markdown), a link to its HTML report, or serve "
                                        "the reports")
    rep.add_argument("batch_id", metavar="BATCH_ID", nargs="?")
    rep.add_argument("--root", help=_ROOT_HELP)
    rep.add_argument("--open", action="store_true", help="print a link a browser opens: presigned HTTPS for an S3 "
                                                         "store, the --serve address for a local one")
    rep.add_argument("--serve", action="store_true", help="serve the batch reports (only those) on $MIP_REPORT_URL "
                                                          "(default http://127.0.0.1:8765) until Ctrl-C")
    rep.add_argument("--json", action="store_true", help="print the report locations and the gate decision as JSON")
    rep.set_defaults(func=_report)
    schema = sub.add_parser("schema", help="print JSON schemas").add_subparsers(
        dest="schema_command", required=True, metavar="SUBCOMMAND")
    schema.add_parser("request", help="the forget request schema (schemas/forget_request.schema.json)"
                      ).set_defaults(func=_schema)


def build_parser() -> argparse.ArgumentParser:
    """The `mip` parser, one helper per command group, added in the order the commands were always added.

    The helpers import names only: the parser (and so `mip --help`) must not import torch, transformers or pydantic.
    """
    from mip_core.adapters import DEFAULT_ARCH

    parser = argparse.ArgumentParser(prog="mip", description="MIP-Editor: unlearning for multimodal LLMs.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (_add_model_commands, _add_benchmark_commands, _add_vanilla_command, _add_eval_command,
                         _add_attribute_command, _add_paths_commands, _add_method_commands, _add_request_commands,
                         _add_models_commands, _add_report_commands):
        add_commands(sub)
    _group_commands(parser, sub)
    _add_examples(parser, "", arch=DEFAULT_ARCH)
    return parser


COMMAND_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the unlearning service (forget requests, batches, published models)",
     ("submit", "status", "requests", "report", "models", "schema")),
    ("research and one-off runs (benchmark, models, attribution, methods)",
     ("benchmark", "model", "vanilla", "eval", "attribute", "paths", "unlearn", "compare")),
)
EXAMPLES: dict[str, tuple[str, ...]] = {
    "": ("mip submit examples/requests/privacy-nuno-ingram.json", "mip status", "mip report BATCH_ID --open",
         "mip COMMAND --help"),
    "submit": ("mip submit request.json --root s3://mip-service/prod",
               "echo '{\"target_model\": \"demo\", \"subjects\": [\"p0003\"], \"requester\": \"dpo@example.org\", "
               "\"reason\": \"privacy\"}' | mip submit -"),
    "status": ("mip status demo-privacy-0001", "mip status demo-privacy-0001 --json", "mip status --json"),
    "requests": ("mip requests --state pending", "mip requests --model demo --json"),
    "report": ("mip report b20261203-211500-6a5920", "mip report b20261203-211500-6a5920 --open",
               "mip report b20261203-211500-6a5920 --json", "mip report --serve --root demo_out/store"),
    "models": ("mip models list", "mip models register --name demo --model demo_out/vanilla --dataset demo_out/bench"),
    "models register": ("mip models register --name demo --model demo_out/vanilla --dataset demo_out/bench",
                        "mip models register --name prod-mllm --model s3://models/prod-mllm --retain "
                        "keep/retain.jsonl --utility keep/utility.jsonl --templates keep/templates.jsonl "
                        "--root s3://mip-service/prod",
                        "mip models register --name prod-mllm --model s3://models/prod-mllm --retain "
                        "s3://data/retain.parquet --utility s3://data/utility.parquet "
                        "--root s3://mip-service/prod"),
    "models list": ("mip models list", "mip models list --json"),
    "models export": ("mip models export demo --out exports/demo-current",
                      "mip models export demo --version v0003 --out /srv/models/demo-v0003"),
    "schema": ("mip schema request > forget_request.schema.json",),
    "schema request": ("mip schema request > forget_request.schema.json",),
    "benchmark": ("mip benchmark make --out demo_out/bench --profiles 100 --seed 0",
                  "mip benchmark export --bench demo_out/bench --out demo_out/keep"),
    "benchmark make": ("mip benchmark make --out demo_out/bench --profiles 100 --seed 0",),
    "benchmark export": ("mip benchmark export --bench demo_out/bench --out demo_out/keep",),
    "model": ("mip model tiny --arch {arch} --out /tmp/tiny",),
    "model tiny": ("mip model tiny --arch {arch} --out /tmp/tiny", "mip model tiny --arch {arch} --size test --out "
                   "/tmp/tiny-test"),
    "vanilla": ("mip vanilla --bench demo_out/bench --out demo_out/vanilla --minutes 15",),
    "eval": ("mip eval --model demo_out/vanilla --bench demo_out/bench --forget 5",
             "mip eval --model demo_out/mip05 --bench demo_out/bench --reference vanilla.json --json mip.json"),
    "attribute": ("mip attribute --model demo_out/vanilla --bench demo_out/bench --forget 5 --out /tmp/paths",),
    "paths": ("mip paths reduce /tmp/paths --out /tmp/graph", "mip paths show /tmp/graph --top 3"),
    "paths reduce": ("mip paths reduce /tmp/paths-a /tmp/paths-b --out /tmp/graph",),
    "paths show": ("mip paths show /tmp/graph --top 3",),
    "unlearn": ("mip unlearn --model demo_out/vanilla --bench demo_out/bench --forget 5 --method mip --out "
                "demo_out/mip05",),
    "compare": ("mip compare --model demo_out/vanilla --bench demo_out/bench --forget 5 --methods all --seeds 3 "
                "--json out.json --plot out.png",),
}


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _group_commands(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:
    """``mip --help`` lists the commands by what they are for, service first, instead of one flat list."""
    helps = {action.dest: action.help for action in sub._choices_actions}
    listed = [name for _, names in COMMAND_GROUPS for name in names]
    assert sorted(listed) == sorted(helps), "every command belongs to exactly one help group"
    lines = [parser.description or ""]
    for title, names in COMMAND_GROUPS:
        lines += ["", f"{title}:"] + [f"  {name:<11s}{helps[name]}" for name in names]
    parser.description = "\n".join(lines)
    sub._choices_actions.clear()  # listed above, grouped
    sub.help = "one of the commands above; `mip COMMAND --help` for its options and examples"


def _add_examples(parser: argparse.ArgumentParser, path: str, *, arch: str) -> None:
    """Every command's help ends with examples (like git's and kubectl's)."""
    examples = EXAMPLES.get(path)
    if examples:
        parser.epilog = "examples:\n" + "\n".join(f"  {line.replace('{arch}', arch)}" for line in examples)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = _subparsers(parser)
    for name, child in (sub.choices.items() if sub else ()):
        _add_examples(child, f"{path} {name}".strip(), arch=arch)


def main(argv: Sequence[str] | None = None) -> int:
    from mip_core.progress import log_to_stderr

    args = build_parser().parse_args(argv)
    log_to_stderr(unless_terminal=True)  # a terminal shows progress bars; a log file gets the lines
    try:
        return int(args.func(args) or 0)
    except MipError as exc:
        print(f"mip: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path or endpoint that is not there: one line, not a traceback
        print(f"mip: error: {exc}; check the path or URI (and MIP_S3_ENDPOINT_URL / AWS_* for s3://)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
