"""``mip-vanilla``: benchmark -> vanilla fine-tuning -> evaluation, the model that unlearning starts from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.params import VanillaSpec
from tasks.benchmark import make_benchmark_task
from tasks.evaluate import evaluate_task
from tasks.train import train_vanilla_task


@flow(name="mip-vanilla")
def vanilla(spec: VanillaSpec) -> str:
    """Build (or reuse) the benchmark and vanilla model under ``spec.workdir``; return the evaluation's JSON.

    Steps hand each other folder paths, never models, so any step can be rerun or reused from disk.
    """
    work = Path(spec.workdir)
    bench = make_benchmark_task(str(work / "bench"), spec.profiles, spec.seed, spec.reuse)
    model = train_vanilla_task(bench, str(work / "vanilla"), spec.arch, spec.size,
                               dataclasses.asdict(spec.train_config()), spec.reuse)
    return evaluate_task(model, bench, spec.forget_pct, str(work / "vanilla_eval.json"),
                         artifact_key="mip-vanilla-eval")


if __name__ == "__main__":
    print(vanilla(VanillaSpec(workdir="demo_out")))
