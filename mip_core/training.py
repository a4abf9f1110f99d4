"""Fine-tune a model on the benchmark until it *knows* the profiles: the "vanilla" model that unlearning starts from.

The loss is cross-entropy on the answer tokens only (prompt and template tokens are context). Every example is
encoded once up front, so a step is one collate plus one forward/backward. A cheap teacher-forced probe on the
training items, per modality, is logged as the learning curve.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mip_core.benchmark import Benchmark, Item
from mip_core.config import Count, Positive, Share, config_class
from mip_core.errors import InputError
from mip_core.modeling.inputs import IGNORE_INDEX, collate, encode
from mip_core.modeling.io import save_model
from mip_core.storage import filesystem
from mip_core.progress import Progress

TRAINING_LOG = "training_log.json"


@config_class
class TrainConfig:
    """Vanilla fine-tuning schedule. Defaults memorise 100 profiles with the ``demo`` model on one CPU thread."""

    steps: Count = 7000  # optimiser steps (upper bound; ``max_minutes`` may stop earlier)
    max_minutes: Positive = 15.0  # wall-clock budget for the optimisation loop
    batch_size: Count = 16  # examples per step
    lr: Positive = 3e-3  # peak AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up from 0
    decay_fraction: Share = 0.25  # final fraction of steps with linear decay to 10% of ``lr``
    clip_norm: float = 1.0  # gradient-norm clipping
    multimodal_weight: float = 1.0  # sampling weight of multimodal items relative to text items
    identity_warmup_steps: int = 1500  # first steps oversampling "who is in the image" items (at most steps/4)
    identity_warmup_weight: float = 8.0  # their sampling weight multiplier during that warm-up
    probe_every: int = 250  # steps between learning-curve probes (0: never)
    probe_items: int = 256  # training items per probe and modality
    seed: int = 0
    threads: int = 1  # torch threads; 1 is fastest and stable on a shared 2-core machine
    # People whose items are left out of training: the model then never saw them, which is exact unlearning of
    # them, the gold reference an edit's forgetting is measured against (`mip vanilla --exclude-forget`)
    exclude_profiles: tuple[str, ...] = ()


@dataclass
class TrainLog:
    """What happened during training: config, per-probe learning curve, totals."""

    config: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)
    steps_done: int = 0
    seconds: float = 0.0
    n_examples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_items(processor: Any, bench: Benchmark, items: Sequence[Item]) -> list[dict[str, Tensor]]:
    """Encode ``items`` with their answers (labels on the answer span only)."""
    return [encode(processor, it.question, bench.load_image(it) if it.image else None, it.answer,
                   item_id=it.item_id) for it in items]


def training_items(bench: Benchmark, exclude_profiles: Sequence[str] = ()) -> list[Item]:
    """The benchmark's training split without the items of ``exclude_profiles`` (profile ids)."""
    unknown = sorted(set(exclude_profiles) - {p.profile_id for p in bench.profiles})
    if unknown:
        raise InputError(f"TrainConfig.exclude_profiles names {len(unknown)} people the benchmark {bench.root} does "
                         f"not have, e.g. {unknown[:3]}; use profile ids of its profiles table")
    excluded = set(exclude_profiles)
    return [it for it in bench.split_items("train") if it.profile_id not in excluded]


def learning_rate(step: int, cfg: TrainConfig, total: int) -> float:
    """Warm-up, constant, then linear decay to 10% over the last ``decay_fraction`` of ``total`` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = total * (1 - cfg.decay_fraction)
    if step < decay_start or cfg.decay_fraction == 0:
        return cfg.lr
    frac = (step - decay_start) / max(1.0, total - decay_start)
    return cfg.lr * (1 - 0.9 * min(1.0, frac))


@torch.no_grad()
def answer_token_accuracy(model: nn.Module, examples: Sequence[dict[str, Tensor]], pad_id: int,
                          batch_size: int = 64) -> tuple[float, float]:
    """Teacher-forced probe: (fraction of examples whose every answer token is the argmax, mean answer loss)."""
    model.eval()
    exact, losses = 0, []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]  # [B, S-1, V] predicts tokens 1..S-1
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        hit = (logits.argmax(-1) == targets) | ~mask
        exact += int(hit.all(dim=1).sum())
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        losses.append(float((nll * mask).sum() / mask.sum()))
    model.train()
    return exact / max(1, len(examples)), sum(losses) / max(1, len(losses))


def train(model: nn.Module, processor: Any, bench: Benchmark, cfg: TrainConfig,
          *, log: Callable[[str], None] = print) -> TrainLog:
    """Fine-tune ``model`` in place on every profile and the utility set; returns the training log."""
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    items = training_items(bench, cfg.exclude_profiles)
    if not items:
        raise InputError(f"benchmark {bench.root} has no training items; regenerate it with `mip benchmark make`")
    t0 = time.perf_counter()
    examples = encode_items(processor, bench, items)
    log(f"encoded {len(examples)} training examples in {time.perf_counter() - t0:.1f}s")
    pad_id = processor.tokenizer.pad_token_id
    weights = [cfg.multimodal_weight if it.modality == "multimodal" else 1.0 for it in items]
    # Identity warm-up: naming the person in the image teaches the vision tower to tell people apart, which every
    # other image-conditioned fact needs first.
    warmup_weights = [w * (cfg.identity_warmup_weight if it.fact == "name" and it.modality == "multimodal" else 1)
                      for w, it in zip(weights, items)]
    probes = {
        modality: [examples[i] for i in rng.sample(idx, min(cfg.probe_items, len(idx)))]
        for modality in ("multimodal", "text")
        if (idx := [i for i, it in enumerate(items) if it.modality == modality and it.kind == "qa"])
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    history = TrainLog(config=asdict(cfg), n_examples=len(examples))
    model.train()
    start = time.perf_counter()
    deadline = start + cfg.max_minutes * 60
    running = 0.0
    bar = Progress(cfg.steps, "training", unit="step")
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg, cfg.steps)
        step_weights = warmup_weights if step < min(cfg.identity_warmup_steps, cfg.steps // 4) else weights
        batch = collate([examples[i] for i in rng.choices(range(len(examples)), step_weights, k=cfg.batch_size)],
                        pad_id)
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower TrainConfig.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        done = step + 1
        bar.update()
        out_of_time = time.perf_counter() > deadline
        if cfg.probe_every and (done % cfg.probe_every == 0 or done == cfg.steps or out_of_time):
            point: dict[str, float] = {"step": done, "seconds": round(time.perf_counter() - start, 1),
                                       "train_loss": round(running, 4)}
            for modality, probe in probes.items():
                acc, probe_loss = answer_token_accuracy(model, probe, pad_id)
                point[f"{modality}_exact"] = round(acc, 4)
                point[f"{modality}_loss"] = round(probe_loss, 4)
            history.curve.append(point)
            log("  ".join(f"{k}={v}" for k, v in point.items()))
        if out_of_time:
            log(f"stopping at step {done}: the {cfg.max_minutes} min budget is spent")
            break
    bar.close()
    history.steps_done = done
    history.seconds = round(time.perf_counter() - start, 1)
    model.eval()
    return history


def save_trained(model: nn.Module, processor: Any, log: TrainLog, uri: str, *, size: str | None) -> None:
    """Save a trained model, then its training log (arch, size, config, curve) beside it.

    The log is written last, so its presence marks a finished save; ``read_training_log`` is its reader.
    """
    save_model(model, processor, uri)
    fs, path = filesystem(uri)
    with fs.open(f"{path.rstrip('/')}/{TRAINING_LOG}", "w") as f:
        f.write(json.dumps({"arch": model.config.model_type, "size": size, **log.to_dict()}, indent=1) + "\n")


def read_training_log(uri: str) -> dict[str, Any] | None:
    """The training log saved with a model by ``save_trained``, or None when there is none (unfinished save)."""
    fs, path = filesystem(uri)
    log_path = f"{path.rstrip('/')}/{TRAINING_LOG}"
    if not fs.exists(log_path):
        return None
    with fs.open(log_path) as f:
        return json.loads(f.read())
