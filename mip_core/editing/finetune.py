"""Gradient-based unlearning baselines: fine-tune every trainable parameter against the forget set.

These are the baselines MIP-Editor is compared with (paper §5; GA_Diff, KL_Min and NPO are in its tables, GA is
their common ancestor). All four share one loop (AdamW, gradient-norm clipping, random batches drawn with
replacement) and differ only in the loss. ``NLL_F`` is the cross-entropy of the forget answers and ``NLL_R`` that
of the retain answers, both averaged over answer tokens (prompt and template tokens are context, as in training).

- **GA**, gradient ascent (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language
  Models"; the first TOFU baseline): ``L = -NLL_F``. Pushes the forget answers down with nothing holding the rest
  of the model in place, so it is unbounded below and drifts into collapse if run long enough.
- **GA_Diff**, gradient difference (TOFU, Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"):
  ``L = -NLL_F + retain_weight * NLL_R``. Ascends on the forget set while descending on the retain set, one batch
  of each per step.
- **KL_Min**, KL minimisation (TOFU): ``L = -NLL_F + retain_weight * KL(p_ref || p_theta)``, the KL between the
  frozen starting model's next-token distribution and the current one, averaged over the retain *answer* tokens.
  It keeps the retain behaviour close to what it was rather than fitting the retain labels again.
- **NPO**, negative preference optimisation (Zhang et al. 2024, "Negative Preference Optimization: From
  Catastrophic Collapse to Effective Unlearning"): ``L = (2 / beta) * mean_i log(1 + (pi_theta(y_i|x_i) /
  pi_ref(y_i|x_i)) ** beta)`` over forget examples only, with the sequence-level log-ratio from summed answer
  log-probabilities. DPO with the forget answers as the losers and no winners: its gradient is GA's, weighted by
  ``2 r^beta / (1 + r^beta)``, which vanishes once an answer is already unlikely, so it slows down where GA
  collapses. The research code iterated only the retain set here (defect 8 in ``docs/method.md`` section 7);
  we do not.

The reference model of KL_Min and NPO is a frozen copy taken before the first step: it doubles the model's memory
for the run, as in TOFU and open-unlearning.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mip_core.config import Count, Index, config_class
from mip_core.editing.base import EditSummary, Log, UnlearnData, batches
from mip_core.errors import InputError
from mip_core.modeling.inputs import IGNORE_INDEX, answer_logprob

__all__ = [
    "FINETUNE_METHODS",
    "NPO",
    "FinetuneConfig",
    "GradientAscent",
    "GradientDifference",
    "KLMinimization",
    "answer_kl",
    "answer_nll",
    "npo_loss",
]

Batch = Mapping[str, Tensor]  # a collated batch, ``labels`` included
LOG_EVERY = 10  # steps between points of the loss curve (plus the first and the last step)


@config_class
class FinetuneConfig:
    """Schedule of the gradient baselines. Fields a method does not use (``beta`` for GA) are ignored."""

    steps: Count = 60  # optimiser steps
    # AdamW learning rate (constant); 5e-4 is the knee on the demo model (BENCHMARKS.md, section 3)
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5e-4
    batch_size: Count = 8  # forget examples per step, and as many retain examples when the method uses them
    retain_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0  # the retain term's (GA_Diff, KL_Min)
    beta: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.1  # NPO inverse temperature
    clip_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0  # gradient-norm clipping
    seed: Index = 0  # batch order and torch RNG (dropout)


# --------------------------------------------------------------------------------------------- loss terms

def _answer_positions(labels: Tensor) -> Tensor:
    """``[R, S-1]`` mask of the positions that predict an answer token (token ``t + 1`` is predicted at ``t``)."""
    return labels[:, 1:] != IGNORE_INDEX


def answer_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy per answer token over the whole batch, summed answer log-probability per row ``[R]``).

    The first is the batch's ``NLL`` in the formulas above (the HF ``loss`` restricted to answer labels); the
    second is NPO's sequence log-likelihood.
    """
    logprob = answer_logprob(logits, labels)  # [R]
    n_tokens = _answer_positions(labels).sum().clamp(min=1)
    return -logprob.sum() / n_tokens, logprob


def answer_kl(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """``KL(p_ref || p_theta)`` of the next-token distributions, averaged over the positions predicting answers.

    ``logits``/``ref_logits`` ``[R, S, V]`` from the current and the reference model on the same batch.
    """
    where = _answer_positions(labels)  # [R, S-1]
    logp = logits[:, :-1][where].float().log_softmax(-1)  # [n_answer, V]
    logp_ref = ref_logits[:, :-1][where].float().log_softmax(-1)
    # kl_div(input, target) = sum target * (log target - input) = KL(target || input)
    return F.kl_div(logp, logp_ref, reduction="sum", log_target=True) / where.sum().clamp(min=1)


def npo_loss(log_ratio: Tensor, beta: float) -> Tensor:
    """``(2 / beta) * mean log(1 + exp(beta * log_ratio))``, i.e. ``-(2 / beta) * mean log sigmoid(-beta * r)``.

    ``log_ratio`` ``[R]``: ``log pi_theta(y|x) - log pi_ref(y|x)`` per forget example. Equals ``(2 / beta) log 2``
    while the model is still the reference.
    """
    return F.softplus(beta * log_ratio).mean() * (2.0 / beta)


# --------------------------------------------------------------------------------------------- the loop

def _forward(model: nn.Module, batch: Batch) -> Tensor:
    """Logits ``[B, S, V]`` of a collated batch; ``labels`` are not passed (the loss is ours, not the model's)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _on(stream: Iterator[dict[str, Tensor]], device: torch.device) -> Iterator[dict[str, Tensor]]:
    for batch in stream:
        yield {k: v.to(device) for k, v in batch.items()}


def _frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class _Finetune:
    """The shared loop; a subclass sets ``name`` and the two flags, and writes :meth:`loss`."""

    name: ClassVar[str]
    uses_retain: ClassVar[bool] = False  # draws a retain batch each step (and needs a non-empty retain set)
    uses_reference: ClassVar[bool] = False  # needs a frozen copy of the starting model
    needs_graph: ClassVar[bool] = False  # fine-tunes all parameters; no path graph involved

    def __init__(self, config: FinetuneConfig | None = None) -> None:
        self.config = config or FinetuneConfig()

    def loss(self, model: nn.Module, reference: nn.Module | None, forget: Batch,
             retain: Batch | None) -> tuple[Tensor, dict[str, float]]:
        """The step's loss and the terms to log (``forget_nll`` always)."""
        raise NotImplementedError

    def run(self, model: nn.Module, adapter: Any, data: UnlearnData, *, graph: Any = None,
            log: Log = print) -> EditSummary:
        """Fine-tune every parameter of ``model`` that requires grad, in place; ``adapter``/``graph`` are unused."""
        cfg = self.config
        if self.uses_retain and not data.retain:
            raise InputError(f"{self.name} has a retain term but the retain set is empty; pass retain examples "
                             f"(UnlearnData.retain), or use 'ga' or 'npo', which need the forget set only")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        params = [p for p, trainable in flags if trainable]
        if not params:
            raise InputError(f"{self.name}: no parameter of the model requires grad; call "
                             f"model.requires_grad_(True) on the parts to fine-tune")
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        device = _device(model)
        reference = _frozen_copy(model) if self.uses_reference else None
        forget = _on(batches(data.forget, cfg.batch_size, data.pad_token_id, rng), device)
        retain = _on(batches(data.retain, cfg.batch_size, data.pad_token_id, rng), device) if self.uses_retain \
            else None
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)  # TOFU's weight decay
        curve: list[dict[str, float]] = []
        start = time.perf_counter()
        model.train()
        try:
            for step in range(1, cfg.steps + 1):
                # Both streams share ``rng``: forget then retain each step, so the draw order is fixed.
                loss, terms = self.loss(model, reference, next(forget), next(retain) if retain is not None else None)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"{self.name} loss became {value} at step {step}; lower "
                                             f"FinetuneConfig.lr (now {cfg.lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                optimizer.step()
                if step == 1 or step % LOG_EVERY == 0 or step == cfg.steps:
                    point = {"step": step, "loss": value, **terms}
                    curve.append(point)
                    log(f"{self.name} step {step}/{cfg.steps}  "
                        + "  ".join(f"{k}={v:.4f}" for k, v in point.items() if k != "step"))
        finally:
            optimizer.zero_grad(set_to_none=True)
            for p, trainable in flags:
                p.requires_grad_(trainable)
            model.eval()
        return EditSummary(method=self.name, trainable_parameters=sum(p.numel() for p in params), steps=cfg.steps,
                           seconds=round(time.perf_counter() - start, 3), curve=tuple(curve),
                           details={"config": asdict(cfg)})


class GradientAscent(_Finetune):
    """GA: ``L = -NLL_F`` (Jang et al. 2023; TOFU)."""

    name = "ga"

    def loss(self, model: nn.Module, reference: nn.Module | None, forget: Batch,
             retain: Batch | None) -> tuple[Tensor, dict[str, float]]:
        nll, _ = answer_nll(_forward(model, forget), forget["labels"])
        return -nll, {"forget_nll": nll.item()}


class GradientDifference(_Finetune):
    """GA_Diff: ``L = -NLL_F + retain_weight * NLL_R`` (TOFU, Maini et al. 2024)."""

    name = "ga_diff"
    uses_retain = True

    def loss(self, model: nn.Module, reference: nn.Module | None, forget: Batch,
             retain: Batch | None) -> tuple[Tensor, dict[str, float]]:
        assert retain is not None  # uses_retain
        nll_f, _ = answer_nll(_forward(model, forget), forget["labels"])
        nll_r, _ = answer_nll(_forward(model, retain), retain["labels"])
        return -nll_f + self.config.retain_weight * nll_r, {"forget_nll": nll_f.item(), "retain_nll": nll_r.item()}


class KLMinimization(_Finetune):
    """KL_Min: ``L = -NLL_F + retain_weight * KL(p_ref || p_theta)`` on retain answer tokens (TOFU)."""

    name = "kl_min"
    uses_retain = True
    uses_reference = True

    def loss(self, model: nn.Module, reference: nn.Module | None, forget: Batch,
             retain: Batch | None) -> tuple[Tensor, dict[str, float]]:
        assert retain is not None and reference is not None  # uses_retain, uses_reference
        nll_f, _ = answer_nll(_forward(model, forget), forget["labels"])
        with torch.no_grad():
            ref_logits = _forward(reference, retain)
        kl = answer_kl(_forward(model, retain), ref_logits, retain["labels"])
        return -nll_f + self.config.retain_weight * kl, {"forget_nll": nll_f.item(), "retain_kl": kl.item()}


class NPO(_Finetune):
    """NPO: ``L = (2 / beta) * mean log(1 + (pi_theta / pi_ref) ** beta)`` on the forget set (Zhang et al. 2024)."""

    name = "npo"
    uses_reference = True

    def loss(self, model: nn.Module, reference: nn.Module | None, forget: Batch,
             retain: Batch | None) -> tuple[Tensor, dict[str, float]]:
        assert reference is not None  # uses_reference
        nll, logprob = answer_nll(_forward(model, forget), forget["labels"])
        with torch.no_grad():
            ref_logprob = answer_logprob(_forward(reference, forget), forget["labels"])
        log_ratio = logprob - ref_logprob  # [B]
        return npo_loss(log_ratio, self.config.beta), {"forget_nll": nll.item(),
                                                       "log_ratio": log_ratio.mean().item()}


FINETUNE_METHODS: dict[str, type[_Finetune]] = {
    cls.name: cls for cls in (GradientAscent, GradientDifference, KLMinimization, NPO)
}
