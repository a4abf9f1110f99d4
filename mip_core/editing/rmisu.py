"""RMisU: representation misdirection at one LLM layer (paper Eqs. 12-16, Adaptive RMU).

Method: docs/method.md section 5.

At the output ``h_l`` of language layer ``l``, forget inputs are pushed towards a random direction and retain
inputs are held where the frozen model puts them:

- forget: ``u_i ~ Uniform(sphere)`` once per forget input ``i`` (or once per request, ``target_per="request"``);
  target ``v_t = lambda * ||h_l^frozen(x)_t|| * u_i`` at every real token ``t`` (an *adaptive* norm: the hidden
  states of small models reach norms in the thousands, so a fixed target such as the research code's 10 does
  nothing; defect 7);
- retain: ``h_l(x_r)`` stays close to ``h_l^frozen(x_r)``;
- plausibility: each wrong option of a forget question stays at least as likely as the frozen model found it
  (the push alone answers a forgotten person with garbage, which a membership attack tells from a stranger);
- ``L = L_f + gamma * L_r (+ ce_weight * CE_retain) (+ plausible_weight * L_p)``. Padding is masked out of every
  term. Both squared distances are divided, token by token, by the frozen squared norm of that token, so the loss
  is O(1) at any model scale and ``gamma`` and the learning rate carry over between models.

The representation terms' forwards stop at layer ``l`` (a hook raises once ``h_l`` exists), so the layers above it
cost nothing there; the retain cross-entropy and the plausibility term run the whole model. Only
what an editor or the caller made trainable moves; the frozen reference is the same model with the editor
switched off, so no second copy of the weights is needed.

Several ranks (a DeepSpeed / torchrun launch): every rank draws the same batch indices, forwards its share
of each batch, weights its losses by its share of the batch's tokens, and the gradients are averaged before
clipping (``mip_core.parallel.data_parallel``). So the trainable slices stay identical on all ranks and follow the
one-process gradient up to float summation order. With one process nothing changes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, replace
from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from mip_core.parallel.zero3_slices import is_partitioned
from mip_core.parallel.data_parallel import average_gradients, global_share, rank_slice, world
from mip_core.adapters.base import ModelAdapter
from mip_core.config import Count, Index, Positive, Share, Weight, config_class
from mip_core.editing.base import Log, UnlearnData
from mip_core.errors import InputError
from mip_core.evaluation.metrics import guess_tail, mc_correct
from mip_core.evaluation.mia import mean_answer_logprob
from mip_core.evaluation.runner import sequence_logprobs
from mip_core.modeling.inputs import IGNORE_INDEX, answer_logprob, collate
from mip_core.progress import Progress


@config_class
class RMisUConfig:
    """RMisU hyper-parameters. ``layer=None`` picks ``round(layer_fraction * n_layers)`` (capped at the last layer).

    Defaults are the most selective setting measured on the demo model (BENCHMARKS.md, section 3), made adaptive
    against exact unlearning (section 9): small steps (``lr`` 1e-2), checked every 10 by multiple choice, the forget
    term on only while the forget items score above chance, the rest of the budget spent on the retain terms. The
    paper's settings are ``layer_fraction=0.2``, ``retain_weight=1``, ``retain_ce_weight=0`` with pruning.
    """

    layer: Index | None = None  # language layer whose output is steered
    layer_fraction: Share = 0.75  # paper: 0.2 (7 of 36); later layers were more selective here (BENCHMARKS.md 3)
    # lambda: target norm as a multiple of the frozen hidden-state norm. With the check below, 2 lands nearest the
    # gold model and narrows the membership attack's tell: at 5 the forget inputs were pushed into garbage (the
    # model wrote "OdalysiteOdalysite..." for a forgotten person), which no stranger's answer looks like; at 2 some
    # answers are plausible values of the right kind again; 1 forgets unevenly; 0.5 did not forget within the
    # budget (BENCHMARKS.md section 9, "How far to push")
    target_scale: Positive = 2.0
    retain_weight: Weight = 5.0  # gamma, against the per-token normalised forget term
    retain_ce_weight: Weight = 0.3  # weight of a retain cross-entropy term (Eq. 11); needs a full retain forward
    steps: Count = 900  # the budget: at most this many optimiser steps
    check_every: Index = 10  # > 0: every this many steps, check whether the forget items are forgotten yet (0: no
    # check, the forget term on for the whole budget)
    # what a check measures: "said", greedy decoding writes no forget answer any more (still_said); "choice", the
    # forget items' multiple-choice accuracy, per modality, is no better than guessing among their options, the
    # level of a model that never saw the people (still_known; free-form items fall back to "said")
    check: Literal["said", "choice"] = "choice"
    # with check_every, once forgotten: "stop" ends the edit; "repair" spends the rest of the budget on the retain
    # terms alone (back to the forget term whenever a check finds them known again), since the steps after
    # forgetting are where the retain terms mend generation (BENCHMARKS.md section 9)
    after_forgotten: Literal["stop", "repair"] = "repair"
    lr: Positive = 1e-2  # 3e-2 over 300 steps forgot as much and kept generation worse (BENCHMARKS.md 9)
    batch_size: Count = 6  # forget inputs per step, paired with as many retain inputs (drawn with replacement)
    clip_norm: Positive = 1.0
    skip_shared_prefix: bool = True  # leave positions a forget input shares with a retain input out of L_f
    # one direction per "request" (most selective, BENCHMARKS.md 5) or "input" (paper)
    target_per: Literal["request", "input"] = "request"
    # a person forgotten earlier is pushed again when their items score above chance and guessing would score
    # that well with less than this probability (the gate's GateConfig.relapse_alpha, so the edit pushes whom the
    # gate would find back), or when the whole group scores above chance (the gate's pooled check)
    relapse_alpha: Share = 0.1
    # weight of the plausibility term: on the forget questions, each wrong option (another value of the same kind)
    # stays at least as likely as the frozen model found it. The push alone leaves a forgotten person's questions
    # answered by garbage, so the right answer scores far below a stranger's (the membership attack's tell); a model
    # that never saw them answers with some plausible value. Measured with the three gold models: privacy leak
    # -0.13 / -0.35 -> +0.09 / -0.02 (BENCHMARKS.md section 9, "How far to push"). 0: off. Items without options
    # have no wrong answers to keep and are left out of it
    plausible_weight: Weight = 1.0
    seed: int = 0

    @model_validator(mode="after")
    def _repair_needs_a_retain_term(self) -> RMisUConfig:
        if self.after_forgotten == "repair" and self.check_every > 0 and not (self.retain_weight > 0 or
                                                                             self.retain_ce_weight > 0):
            raise ValueError("RMisUConfig.after_forgotten='repair' needs a retain term (what repairs): set "
                             "retain_weight or retain_ce_weight > 0, or after_forgotten='stop'")
        return self

    def resolve_layer(self, n_layers: int) -> int:
        layer = self.layer if self.layer is not None else min(n_layers - 1, round(self.layer_fraction * n_layers))
        if layer >= n_layers:
            raise InputError(f"RMisUConfig.layer={layer} but the language model has {n_layers} layers "
                             f"(0..{n_layers - 1}); pass a smaller --layer")
        return layer

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Stop(Exception):
    """Raised by the layer-``l`` hook to end a forward once ``h_l`` is known."""


@contextmanager
def _layer_output(block: nn.Module, stop: bool) -> Iterator[dict[str, Tensor]]:
    """Capture the block's output hidden states ``[B, S, D]``; with ``stop``, end the forward right there."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple[object, ...], out: object) -> None:
        store["h"] = out[0] if isinstance(out, tuple) else out  # type: ignore[assignment,index]
        if stop:
            raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def hidden_at(model: nn.Module, block: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``h_l`` of ``batch`` (no labels), running the model only up to ``block``."""
    with _layer_output(block, stop=True) as store:
        try:
            model(**batch)
        except _Stop:
            pass
    if "h" not in store:
        raise RuntimeError("the RMisU layer was never reached in the forward; is the block part of this model?")
    return store["h"]


def sphere(n: int, dim: int, seed: int) -> Tensor:
    """``n`` directions drawn uniformly from the unit sphere in ``dim`` dimensions ``[n, dim]``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, dim, generator=g)
    return u / u.norm(dim=-1, keepdim=True)


def _squared_error(h: Tensor, target: Tensor, frozen_norm: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens (``mask`` ``[B, S]``) of ``||h_t - target_t||^2 / ||h^frozen_t||^2``.

    Per-token normalisation: the few template tokens every input shares carry hidden-state norms several times
    those of the question's tokens (and are identical in forget and retain inputs); weighting each token by its
    own norm keeps them from dominating the loss.
    """
    m = mask.to(h.dtype)
    err = ((h - target) ** 2).sum(-1) / (frozen_norm**2).clamp(min=1e-12)  # [B, S]
    return (err * m).sum() / m.sum().clamp(min=1)


def retain_prefix_lengths(forget: Sequence[dict[str, Tensor]], retain: Sequence[dict[str, Tensor]],
                          image_token_id: int | None = None) -> list[int]:
    """For each forget example, the longest token prefix it shares with any retain example.

    Image placeholder tokens (``image_token_id``) stand for different pixels in different inputs, so a prefix
    ends at the first of them.

    A causal model computes identical hidden states on identical prefixes, so on those positions no edit can
    move a forget input without moving a retain input the same way: there the forget term only fights the
    retain term (the chat template, and e.g. "What is the birthplace of" before a name). They are left out.
    """
    if not retain:
        return [0] * len(forget)
    length = max(int(e["input_ids"].shape[0]) for e in [*forget, *retain])
    table = torch.full((len(retain), length), -1, dtype=torch.long)  # [R, S], -1 past the end
    for r, ex in enumerate(retain):
        table[r, : ex["input_ids"].shape[0]] = ex["input_ids"]
    out = []
    for ex in forget:
        ids = ex["input_ids"]
        same = (table[:, : ids.shape[0]] == ids).long()  # [R, S_i]
        n = int(same.cumprod(1).sum(1).max())
        if image_token_id is not None:
            images = (ids == image_token_id).nonzero()
            n = min(n, int(images[0, 0])) if len(images) else n
        out.append(n)
    return out


def _retain_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the answer tokens of a batch."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)


def run_rmisu(model: nn.Module, adapter: ModelAdapter, data: UnlearnData, params: list[nn.Parameter],
              cfg: RMisUConfig, *, reference: Callable[[], AbstractContextManager[None]],
              log: Log = print) -> tuple[list[dict[str, float]], int]:
    """Optimise ``params`` with the RMisU loss; returns ``(curve, layer)``.

    Args:
        params: the only tensors that move (an editor's slices; all neurons of the sites for full-model RMisU).
        reference: a context manager factory under which ``model`` is the frozen, unedited model
            (``editor.disabled``): the reference states cost one no-grad forward up to layer ``l`` per batch.

    People an earlier edit forgot (``data.forget_earlier``) are kept forgotten, not forgotten again: each check
    measures them apart, and while they score above chance the forget term also takes the items of those known
    again (the gate would not publish a version under which they come back). Without a check
    (``check_every=0``) they are left alone. A budget that runs out right after a check found anyone known again
    ends at the weights of the last check that found everyone forgotten (:func:`_back_to`).
    """
    run = _Run(model, adapter, data, cfg, reference)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.eval()  # no dropout: the frozen and edited forwards must differ only by the edit
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = Progress(cfg.steps, "editing (RMisU)", unit="step", enabled=world()[0] == 0)
    forgetting = {TONIGHT}  # the groups the forget term draws from; people forgotten earlier join when known
    last_known: dict[str, float] = {}
    forgotten_at: tuple[int, list[Tensor]] | None = None  # the last check that found every group forgotten
    copyable = not any(is_partitioned(p) for p in params)  # a ZeRO-3 shard's copy would be an empty placeholder
    for step in range(cfg.steps):
        point = run.train_step(optimizer, params, step, forget=run.pool(forgetting))
        bar.update()
        known = run.record(point, step, t0, curve, log)
        if known is None:
            continue
        last_known = known
        forgotten = not any(known.values())
        if forgotten and cfg.after_forgotten == "stop":
            log(f"rmisu: {_WHAT[cfg.check]} after {step + 1} of {cfg.steps} steps; stopping")
            break
        if forgotten and copyable:
            forgotten_at = (step + 1, [p.detach().clone() for p in params])
        now = {group for group, share in known.items() if share > 0}
        for group in sorted(now ^ forgetting):
            # AdamW's moments are kept across the switch: clearing them made the first steps after it full-size
            # (Adam's bias correction) and cost retain ROUGE-L 0.78 -> 0.66 on the gold benchmark (BENCHMARKS.md 9)
            log(f"rmisu: step {step + 1}: " + _switch(group, now, cfg.check))
        forgetting = now
    bar.close()
    if any(last_known.values()) and forgotten_at is not None:
        _back_to(params, forgotten_at, curve, log)
    return curve, run.layer


@torch.no_grad()
def _back_to(params: list[nn.Parameter], forgotten_at: tuple[int, list[Tensor]], curve: list[dict[str, float]],
             log: Log) -> None:
    """End the edit at the weights of the last check that found every group forgotten, when the budget ran out
    right after a check found them known again (repair lets them drift back, and the forget term had no steps
    left to push): measured on the gold benchmark, where the budget happened to end decided whether a subset
    ended at chance or at 0.44. The copy is of the trainable tensors only (an editor's slices), the same on every
    rank since every rank's checks decide alike. ZeRO-3 partitioned trainables (whole-model RMU under a sharded
    launch) are not copied, so such an edit keeps its last weights."""
    step, saved = forgotten_at
    for param, value in zip(params, saved, strict=True):
        param.copy_(value)
    curve[-1]["back_to_step"] = float(step)
    log(f"rmisu: the last check found the forget items known again; back to the weights of step {step}, the last "
        "check that found them forgotten")


TONIGHT, EARLIER = "forget", "earlier"  # the check's groups: this edit's forget items, people forgotten before
_WHAT = {"said": "no forget answer is said", "choice": "the forget items are at chance"}


def _switch(group: str, now: set[str], check: str) -> str:
    """The log line of a check that turned ``group``'s items in the forget term on or off (``now``: the groups
    on after it)."""
    if group == TONIGHT:
        return ("known again, back to the forget term" if group in now else
                f"{_WHAT[check]}; " + ("retain terms alone from here" if not now else "they leave the forget term"))
    return ("people forgotten earlier are known again: their items join the forget term" if group in now else
            "people forgotten earlier are forgotten again: their items leave the forget term")


class _Run:
    """One RMisU run: what every step reads, fixed before the first one (``rng`` advances: it draws the batches)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, data: UnlearnData, cfg: RMisUConfig,
                 reference: Callable[[], AbstractContextManager[None]]) -> None:
        """Check the inputs, seed, and fix the layer, the target directions and the masked prefixes.

        The probe forward runs right after seeding, as it always has: a model with dropout still in training mode
        draws from the torch generator there, and the edit must stay reproducible from ``cfg.seed``.
        """
        if (cfg.retain_weight > 0 or cfg.retain_ce_weight > 0) and not data.retain:
            raise InputError("RMisU with a retain term needs retain examples; give some, or set retain_weight=0 "
                             "and retain_ce_weight=0 (with after_forgotten='stop', since repair is done by them)")
        self.model, self.data, self.cfg, self.reference = model, data, cfg, reference
        self.layer = cfg.resolve_layer(adapter.n_layers("language"))
        self.block = adapter.block(adapter.site("language", self.layer))
        self.size = size = world()[1]  # ranks sharing each batch
        if cfg.batch_size < size:
            raise InputError(f"RMisUConfig.batch_size={cfg.batch_size} is below the {size} ranks that share "
                             f"each batch; set batch_size >= {size} or launch fewer ranks")
        self.rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        hidden_size = _probe_width(model, self.block, data)
        self.device = next(model.parameters()).device
        self.direction_of = _direction_index(data, cfg.target_per)  # forget example -> row of `directions`
        self.directions = _directions(self.direction_of, data.forget_earlier, hidden_size, cfg.seed
                                      ).to(self.device)  # [n, D]
        self.prefixes = (retain_prefix_lengths(data.forget, data.retain, adapter.image_token_id)
                         if cfg.skip_shared_prefix else [0] * len(data.forget))
        # ZeRO-3 releases a module's gathered weights after its backward by counting the module's forwards since
        # the last backward, and miscounts when two forwards (forget, retain) share one backward: the weights
        # then stay gathered (the memory ZeRO-3 saves is lost) and the next gather fails. So there, each forward
        # gets its own backward (the same gradient: they add up in .grad).
        self.per_forward = any(is_partitioned(p) for p in model.parameters())
        # each forget example's check group; a check measures each group apart, so people forgotten earlier
        # coming back are seen even while this edit's items sit below chance (pooled, they would cancel out)
        self.group_of = [EARLIER if earlier else TONIGHT
                         for earlier in data.forget_earlier or [False] * len(data.forget)]
        self.parts = {group: data.only_forget(self.members(group)) if len(set(self.group_of)) > 1 else data
                      for group in dict.fromkeys(self.group_of)}
        # people forgotten earlier whom the last check found known again on their own items (request ids): only
        # their items join the forget term, so those still at chance are not pushed below it
        self.person_of = list(data.forget_requests) or [f"#{i}" for i in range(len(data.forget))]
        self.relapsed: set[str] = set()
        # the forget items' wrong options and the frozen model's mean token log-probability of each [n]
        self.wrong, self.wrong_floor = (_wrong_options(model, data, reference, cfg.batch_size, self.device)
                                        if cfg.plausible_weight > 0 else ([], torch.zeros(0)))

    def frozen_hidden(self, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad(), self.reference():
            return hidden_at(self.model, self.block, batch)

    def members(self, group: str) -> list[int]:
        """Positions of ``group``'s forget examples, in order."""
        return [i for i, g in enumerate(self.group_of) if g == group]

    def pool(self, groups: set[str]) -> list[int]:
        """What the forget term draws from: this edit's examples (when ``groups`` holds them) and those of the
        people forgotten earlier that the last check found known again (when it holds ``EARLIER``), in order."""
        return [i for i, g in enumerate(self.group_of)
                if g in groups and (g == TONIGHT or self.person_of[i] in self.relapsed)]

    def credits(self, group: str) -> list[tuple[str, float]]:
        """``group``'s per-item :func:`credits` by ``cfg.check``: with ``"said"`` every item is scored as
        free-form (still said or not), so :func:`known_share` of them is :func:`still_said`."""
        part = self.parts[group]
        return credits(self.model, part if self.cfg.check == "choice" else replace(part, forget_options=()),
                       self.device, self.cfg.batch_size)

    def earlier_known(self) -> float:
        """Check the people forgotten earlier: returns the share of their items known again, per modality as for
        this edit's items (what the gate would see), and keeps in ``relapsed`` who is back: known on their own
        items beyond luck (``cfg.relapse_alpha``, as the gate judges each person), or known at all while the
        group is. The forget term then pushes those people only: pushing the whole group drove it far below
        chance (BENCHMARKS.md section 10), a trace of its own; and a person answered again on 7 of 11 items hid in
        a group at chance."""
        item_credits = self.credits(EARLIER)
        per_person: dict[str, list[tuple[str, float]]] = {}
        for i, credit in zip(self.members(EARLIER), item_credits, strict=True):
            per_person.setdefault(self.person_of[i], []).append(credit)
        share = known_share(item_credits)
        self.relapsed = {person for person, own in per_person.items() if known_share(own) > 0
                         and (share > 0 or guess_tail(_outcomes(own)) < self.cfg.relapse_alpha)}
        return share

    def train_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], step: int,
                   forget: Sequence[int]) -> dict[str, float]:
        """One optimiser step on a fresh forget batch drawn from ``forget`` (forget example positions) and a
        retain batch; returns the step's curve point. With ``forget`` empty (a repair step) only the retain terms
        move the weights."""
        cfg = self.cfg
        optimizer.zero_grad(set_to_none=True)
        if forget:
            loss, point = self.forget_loss(step, forget)
        else:
            loss, point = torch.zeros((), device=self.device), {"step": step + 1}
        if self.data.retain and (cfg.retain_weight > 0 or cfg.retain_ce_weight > 0):
            loss = self.add_retain_loss(loss, point)
        if self.wrong:
            loss = self.add_plausible_loss(loss, point)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"RMisU loss became {float(loss)} at step {step + 1}; lower RMisUConfig.lr")
        if not self.per_forward:
            loss.backward()
        average_gradients(params)  # no-op on one process
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        point["loss"] = loss.item()
        return point

    def forget_loss(self, step: int, pool: Sequence[int]) -> tuple[Tensor, dict[str, float]]:
        """Draw a forget batch from ``pool`` and push its ``h_l`` towards the targets: ``L_f`` (this rank's share),
        the point. (With the whole forget set as the pool, the draws are those of an edit without groups.)"""
        data, cfg = self.data, self.cfg
        f_idx = _share([pool[self.rng.randrange(len(pool))] for _ in range(cfg.batch_size)], data.forget)
        fb = _on(collate([data.forget[i] for i in f_idx], data.pad_token_id), self.device)
        fb.pop("labels")
        f_mask = fb["attention_mask"].clone()
        for row, i in enumerate(f_idx):
            f_mask[row, : self.prefixes[i]] = 0  # see retain_prefix_lengths
        h_frozen = self.frozen_hidden(fb)
        f_norm = h_frozen.norm(dim=-1)  # [B, S]
        u = self.directions[[self.direction_of[i] for i in f_idx]]  # [B, D]
        target = cfg.target_scale * f_norm.unsqueeze(-1) * u.unsqueeze(1)  # [B, S, D]
        loss_f = _squared_error(hidden_at(self.model, self.block, fb), target, f_norm, f_mask)
        loss = _global_mean(loss_f, f_mask.sum(), self.size)
        if self.per_forward:
            loss.backward()
        return loss, {"step": step + 1, "forget": loss_f.item()}

    def add_retain_loss(self, loss: Tensor, point: dict[str, float]) -> Tensor:
        """Draw a retain batch and add its terms to ``loss``: cross-entropy first, then ``gamma * L_r``.

        The addition order is kept as it was: floating-point sums depend on it, and so would the edited weights.
        """
        data, cfg, size = self.data, self.cfg, self.size
        r_idx = _share([self.rng.randrange(len(data.retain)) for _ in range(cfg.batch_size)], data.retain)
        rb = _on(collate([data.retain[i] for i in r_idx], data.pad_token_id), self.device)
        labels = rb.pop("labels")
        r_frozen = self.frozen_hidden(rb)
        retain_terms: list[Tensor] = []
        if cfg.retain_ce_weight > 0:
            with _layer_output(self.block, stop=False) as store:
                logits = self.model(**rb).logits
            h_r = store["h"]
            ce = _retain_ce(logits, labels)
            n_answer = (labels[:, 1:] != IGNORE_INDEX).sum()
            retain_terms.append(cfg.retain_ce_weight * _global_mean(ce, n_answer, size))
            loss = loss + retain_terms[-1]
            point["retain_ce"] = ce.item()
        else:
            h_r = hidden_at(self.model, self.block, rb)
        loss_r = _squared_error(h_r, r_frozen, r_frozen.norm(dim=-1), rb["attention_mask"])
        retain_terms.append(cfg.retain_weight * _global_mean(loss_r, rb["attention_mask"].sum(), size))
        loss = loss + retain_terms[-1]
        if self.per_forward:
            sum(retain_terms).backward()  # type: ignore[union-attr]
        point["retain"] = loss_r.item()
        return loss

    def add_plausible_loss(self, loss: Tensor, point: dict[str, float]) -> Tensor:
        """Draw wrong options of forget questions and add ``plausible_weight * mean(relu(floor - mean log p))``:
        an option the edit made less likely than the frozen model found it is pulled back up to that, none above.
        The right options are left to the forget term and the check: pulling them up too undid the forgetting."""
        cfg = self.cfg
        idx = _share([self.rng.randrange(len(self.wrong)) for _ in range(cfg.batch_size)], self.wrong)
        batch = _on(collate([self.wrong[i] for i in idx], self.data.pad_token_id), self.device)
        labels = batch.pop("labels")
        n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)  # [B]
        level = answer_logprob(self.model(**batch).logits, labels) / n_tokens.to(self.device)  # [B]
        below = (self.wrong_floor[idx].to(level.device) - level).clamp(min=0).mean()
        term = cfg.plausible_weight * _global_mean(below, torch.tensor(len(idx)), self.size)
        if self.per_forward:
            term.backward()
        point["plausible"] = below.item()
        return loss + term

    def record(self, point: dict[str, float], step: int, t0: float, curve: list[dict[str, float]], log: Log
               ) -> dict[str, float] | None:
        """Check, log and keep the step's point when due; when checked, per group, 0 once forgotten: for this
        edit's forget items the share still known (``said`` or ``known``, by ``cfg.check``); for the people
        forgotten earlier (where there are any) how many are back (the curve's ``back_earlier``, beside their
        share known, ``known_earlier``)."""
        cfg = self.cfg
        check = cfg.check_every > 0 and (step + 1) % cfg.check_every == 0
        key = "said" if cfg.check == "said" else "known"
        known: dict[str, float] = {}
        if check:
            for group in self.parts:
                if group == TONIGHT:
                    known[group] = point[key] = known_share(self.credits(group))
                else:
                    point[f"{key}_{group}"] = self.earlier_known()
                    known[group] = point[f"back_{group}"] = float(len(self.relapsed))
        if check or step == 0 or (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            point["seconds"] = round(time.perf_counter() - t0, 2)
            curve.append({k: round(v, 5) for k, v in point.items()})
            log("rmisu " + "  ".join(f"{k}={v}" for k, v in curve[-1].items()))
        return known if check else None


@torch.no_grad()
def still_said(model: nn.Module, data: UnlearnData, device: torch.device, batch_size: int) -> float:
    """Share of forget inputs whose answer is still what the model says: every answer token is the model's
    most likely next token given the ones before (teacher forcing, so greedy decoding writes the answer; the end
    token is not required). One forward per batch, no generation.

    ``RMisUConfig.check="said"`` checks by this; ``"choice"`` (the default) by :func:`still_known`, which uses
    it for items without options. Alone, it ended edits on the demo model after 50-100 of 300 steps, forgetting
    as much on benchmark items but less on the service's own probes (BENCHMARKS.md section 8), and with repair it
    let multiple choice slip above the gold model's (section 9). Every rank scores every input in the same order
    (ZeRO-3 gathers weights collectively), so all ranks reach the same decision."""
    return sum(said_each(model, data.forget, data.pad_token_id, device, batch_size)) / max(len(data.forget), 1)


@torch.no_grad()
def said_each(model: nn.Module, examples: Sequence[dict[str, Tensor]], pad_token_id: int, device: torch.device,
              batch_size: int) -> list[bool]:
    """Per example, whether its answer is still what the model says (see :func:`still_said`)."""
    said: list[bool] = []
    for start in range(0, len(examples), batch_size):
        batch = _on(collate(list(examples[start : start + batch_size]), pad_token_id), device)
        labels = batch.pop("labels")[:, 1:]  # [B, S-1]: token t+1 is predicted at position t
        predicted = model(**batch).logits[:, :-1].argmax(-1)  # [B, S-1]
        answer = labels != IGNORE_INDEX
        end = answer & (answer.cumsum(-1) == answer.sum(-1, keepdim=True))  # the answer's last token: the end
        scored = answer & ~end
        scored = torch.where(scored.any(-1, keepdim=True), scored, answer)  # a one-token answer: score the end
        said += ((predicted == labels) | ~scored).all(-1).tolist()
    return said


def still_known(model: nn.Module, data: UnlearnData, device: torch.device, batch_size: int) -> float:
    """Share of forget items the model still knows beyond a stranger's level; 0 once it knows them no better.

    An item with options counts as right when its right option is the most likely (``mc_correct``). Per
    modality, the items right beyond what guessing among the options gets (``sum(1 / n_options)``) are still
    known; a model that never saw the people scores about that much (BENCHMARKS.md section 9: the gold models
    answer their forget people at 0.20 / 0.31 with 4 options). Free-form items count when still said
    (``still_said``). So an edit checked this way stops at a stranger's level rather than driving the forget
    items below chance, which is the trace a membership attack sees (section 9: MIA AUC 0.10-0.22 against the
    gold model's 0.45). Every rank scores every option in the same order, so all ranks decide alike.
    """
    return known_share(credits(model, data, device, batch_size))


def known_share(item_credits: Sequence[tuple[str, float]]) -> float:
    """:func:`still_known` from :func:`credits`: per modality, the credits beyond 0 (a free-form item's whole
    credit), over the number of items."""
    beyond: dict[str, float] = {}
    for modality, credit in item_credits:
        beyond[modality] = beyond.get(modality, 0.0) + credit
    free = beyond.pop(_FREE, 0.0)
    # at chance exactly, e.g. sums of 1/3, reads as 0
    return (sum(b for b in beyond.values() if b > 1e-9) + free) / max(len(item_credits), 1)


_FREE = "\0free"  # the credits of free-form items: counted whole, not against chance


def _outcomes(item_credits: Sequence[tuple[str, float]]) -> list[tuple[bool, float]]:
    """:func:`credits` back as ``(right, chance)`` per item, what :func:`guess_tail` takes: with options a credit
    is ``right - chance``, so it is positive exactly when right; free-form items have chance 0."""
    return [(credit > 0, 0.0 if modality == _FREE else (1 - credit if credit > 0 else -credit))
            for modality, credit in item_credits]


@torch.no_grad()
def credits(model: nn.Module, data: UnlearnData, device: torch.device, batch_size: int
            ) -> list[tuple[str, float]]:
    """Per forget item, in order, ``(modality, credit)``: with options, 1 if the right option is the most likely
    minus ``1 / n_options`` (what guessing gets); free-form, ``(_FREE, 1.0)`` while its answer is still said,
    else 0."""
    options = data.options()
    with_options = [i for i, (opts, _) in enumerate(options) if opts]
    flat = [ex for i in with_options for ex in options[i][0]]
    scores = sequence_logprobs(model, flat, data.pad_token_id, batch_size, device=device)
    out: list[tuple[str, float]] = [(_FREE, 0.0)] * len(data.forget)
    start = 0
    for i in with_options:
        opts, answer = options[i]
        modality = data.forget_modality[i] if data.forget_modality else "all"
        out[i] = (modality, mc_correct(scores[start : start + len(opts)], answer) - 1 / len(opts))
        start += len(opts)
    free = [i for i, (opts, _) in enumerate(options) if not opts]
    for i, said in zip(free, said_each(model, [data.forget[i] for i in free], data.pad_token_id, device,
                                       batch_size), strict=True):
        out[i] = (_FREE, float(said))
    return out


def _global_mean(loss: Tensor, count: Tensor, size: int) -> Tensor:
    """``loss`` (a mean over ``count`` tokens of this rank's share), reweighted so that averaging gradients
    over ranks gives the gradient of the mean over the whole batch (``global_share``); unchanged on one rank.
    """
    return loss if size == 1 else loss * global_share(float(count))


def _share(idx: list[int], examples: Sequence[dict[str, Tensor]]) -> list[int]:
    """This rank's examples of a batch all ranks drew alike (the whole batch on one process).

    ZeRO-3 gathers each module's weights with a collective, so every rank must run the same modules in the
    same order: a share without images while another rank's share has some would run the vision tower on some
    ranks only and hang (or fail DeepSpeed's trace check). So shares are dealt with image examples first and,
    when a batch has fewer image examples than ranks, every rank takes the whole batch (the averaged gradient
    is then the one-process gradient). Every rank decides alike from the same indices, without communicating.
    """
    rank, size = world()
    if size == 1:
        return idx

    def has_image(i: int) -> bool:
        return "pixel_values" in examples[i]

    n_image = sum(map(has_image, idx))
    if n_image == 0 or n_image == len(idx):
        return rank_slice(idx)
    if n_image >= size:
        return rank_slice(sorted(idx, key=lambda i: not has_image(i)))  # stable: image examples dealt first
    return list(idx)


def _direction_index(data: UnlearnData, target_per: str) -> list[int]:
    """Row of the direction table per forget example: its own (``input``) or its request's (``request``)."""
    if target_per == "input" or not data.forget_requests:  # without request ids each input is its own request
        return list(range(len(data.forget)))
    order = {r: k for k, r in enumerate(data.request_ids())}
    return [order[r] for r in data.forget_requests]


def _directions(direction_of: list[int], earlier: Sequence[bool], dim: int, seed: int) -> Tensor:
    """The target directions ``[n, D]``: this edit's rows first, then those of people forgotten earlier, drawn apart
    (``seed + 1``) so that adding them leaves this edit's directions (and so its weights) as they were without them.
    """
    n = max(direction_of) + 1
    flags = earlier or [False] * len(direction_of)  # one per forget example, like direction_of
    mine = max((row for row, old in zip(direction_of, flags, strict=True) if not old),
               default=-1) + 1  # earlier examples follow this edit's, so their rows do too
    return torch.cat([sphere(mine, dim, seed), sphere(n - mine, dim, seed + 1)]) if n > mine else sphere(n, dim, seed)


@torch.no_grad()
def _wrong_options(model: nn.Module, data: UnlearnData, reference: Callable[[], AbstractContextManager[None]],
                   batch_size: int, device: torch.device) -> tuple[list[dict[str, Tensor]], Tensor]:
    """The wrong options of this edit's forget items with options (encoded with the option as the answer), and
    the frozen model's mean per-token log-probability of each ``[n]``: the floor the plausibility term keeps.
    People forgotten earlier are left out: their own edit kept theirs, and an edit that finds them at chance must
    stay the edit it would be without them."""
    earlier = data.forget_earlier or [False] * len(data.forget)
    wrong = [ex for (opts, right), old in zip(data.options(), earlier, strict=True) if not old
             for k, ex in enumerate(opts) if k != right]
    with reference():
        return wrong, torch.tensor(mean_answer_logprob(model, wrong, data.pad_token_id, batch_size, device=device))


def _on(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _probe_width(model: nn.Module, block: nn.Module, data: UnlearnData) -> int:
    one = _on(collate([data.forget[0]], data.pad_token_id), next(model.parameters()).device)
    one.pop("labels")
    with torch.no_grad():
        return int(hidden_at(model, block, one).shape[-1])


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every model parameter except ``params`` (restored on exit, also on error)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


__all__ = ["RMisUConfig", "credits", "hidden_at", "known_share", "run_rmisu", "said_each", "sphere", "still_known",
           "still_said", "trainable_only"]
