"""Prefect task: fine-tune a tiny model into the "vanilla" model that unlearning starts from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mip_core.benchmark import load_benchmark
from mip_core.modeling import build_tiny
from mip_core.training import TrainConfig, read_training_log, save_trained, train
from tasks.logs import forward_progress


# No retries: a retry would silently redo minutes of training; rerun the flow instead (reuse keeps the rest).
@task(name="train-vanilla", cache_policy=NO_CACHE)
def train_vanilla_task(bench_dir: str, out_dir: str, arch: str, size: str, cfg: dict[str, Any],
                       reuse: bool = True) -> str:
    """Train a random ``arch``/``size`` tiny model on ``bench_dir``, save it to ``out_dir``, return that.

    ``cfg`` holds :class:`TrainConfig` fields (plain values, so the UI shows them as task inputs); its
    ``seed`` also seeds the initial weights, as ``mip vanilla`` does. With ``reuse`` a model in ``out_dir``
    trained with the same architecture, size and config is kept: retraining costs minutes, and later runs
    compare against it. ``training_log.json`` is written last, so its presence also marks a finished save.
    """
    logger = get_run_logger()
    config = TrainConfig(**cfg)
    wanted = {"arch": arch, "size": size, "config": json.loads(json.dumps(dataclasses.asdict(config)))}
    previous = read_training_log(out_dir) if reuse and Path(out_dir, "model.safetensors").is_file() else None
    if previous is not None:
        if all(previous.get(k) == v for k, v in wanted.items()):
            logger.info("reusing trained model %s (pass reuse=False to retrain)", out_dir)
            return out_dir
        logger.info("model in %s was trained with other settings; retraining", out_dir)
    bench = load_benchmark(bench_dir)
    model, processor = build_tiny(arch, size=size, seed=config.seed)
    with forward_progress():
        log = train(model, processor, bench, config, log=logger.info)
    save_trained(model, processor, log, out_dir, size=size)
    logger.info("trained %d steps in %.0fs; wrote %s", log.steps_done, log.seconds, out_dir)
    return out_dir
