"""Prefect task: evaluate a saved model on the benchmark and publish the table to the run."""

from __future__ import annotations

import os

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mip_core.benchmark import load_benchmark
from mip_core.evaluation import evaluate, format_table, write_json
from mip_core.modeling import load_model
from tasks.logs import forward_progress


# One retry: the model may come from object storage (s3://), where a download can fail transiently.
@task(name="evaluate", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def evaluate_task(model_uri: str, bench_dir: str, forget_pct: int, out_json: str,
                  artifact_key: str | None = None) -> str:
    """Evaluate ``model_uri`` on every split, write the rows to ``out_json`` and return ``out_json``.

    The table also goes to the run log and to a markdown artifact (under ``artifact_key`` when given, which
    lists it on the UI's Artifacts page across runs), so a run can be judged without opening files.
    """
    torch.set_num_threads(int(os.environ.get("MIP_THREADS", "1")))  # as `mip eval`: 1 suits shared CPUs
    logger = get_run_logger()
    loaded = load_model(model_uri)
    with forward_progress():
        rows = evaluate(loaded.model, loaded.processor, load_benchmark(bench_dir), forget_pct=forget_pct)
    write_json(rows, out_json)
    table = format_table(rows)
    logger.info("evaluation of %s on %s (forget %d %%):\n%s", model_uri, bench_dir, forget_pct, table)
    create_markdown_artifact(
        markdown=f"### Evaluation of `{model_uri}`\n\nBenchmark `{bench_dir}`, forget split {forget_pct} %; "
                 f"rows in `{out_json}`.\n\n```text\n{table}\n```\n",
        key=artifact_key, description=f"MC accuracy and ROUGE-L of {model_uri}")
    return out_json
