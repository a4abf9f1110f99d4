"""The gradient baselines (GA, GA_Diff, KL_Min, NPO) on a tiny LM that first learns both the forget and retain sets.

``TinyLM`` predicts each token from itself and the previous token through one shared hidden layer, so the forget
facts (persons 0-1) and the retain facts (persons 2-5) share parameters: plain gradient ascent on the forget set
damages the retain set, and the retain terms of GA_Diff and KL_Min visibly prevent that.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from toy_models import IMAGE, toy, toy_example

from mip_core.editing.base import UnlearnData
from mip_core.editing.finetune import (
    FINETUNE_METHODS,
    NPO,
    FinetuneConfig,
    GradientAscent,
    GradientDifference,
    KLMinimization,
    answer_kl,
    answer_nll,
    npo_loss,
)
from mip_core.errors import InputError
from mip_core.modeling.inputs import IGNORE_INDEX, answer_logprob, collate

PAD, BOS, EOS = 0, 1, 2
PERSONS, RELATIONS = 6, 2
N_FORGET_PERSONS = 2
VOCAB = 3 + PERSONS + RELATIONS + PERSONS * RELATIONS  # specials, persons, relations, one answer per fact
# Strong enough to unlearn a fact in 30 steps; weak enough that the retain terms can hold the rest.
CONFIG = FinetuneConfig(steps=30, lr=3e-2, batch_size=4)


class TinyLM(nn.Module):
    """``logits_t = head(tanh(fc([embed(x_t), embed(x_{t-1})])))``: a causal bigram LM with a shared hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)
        self.modes: list[bool] = []  # self.training at every forward

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> SimpleNamespace:
        self.modes.append(self.training)
        e = self.embed(input_ids)  # [B, S, 8]
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return SimpleNamespace(logits=self.head(torch.tanh(self.fc(torch.cat([e, prev], dim=-1)))))


def fact(person: int, relation: int) -> dict[str, Tensor]:
    """``BOS person relation -> answer EOS``; every (person, relation) has its own answer token."""
    answer = 3 + PERSONS + RELATIONS + person * RELATIONS + relation
    return toy_example([BOS, 3 + person, 3 + PERSONS + relation, answer, EOS], n_answer=2)


FORGET = [fact(p, r) for p in range(N_FORGET_PERSONS) for r in range(RELATIONS)]
RETAIN = [fact(p, r) for p in range(N_FORGET_PERSONS, PERSONS) for r in range(RELATIONS)]
DATA = UnlearnData(forget=FORGET, retain=RETAIN, pad_token_id=PAD)


@pytest.fixture(scope="module")
def learned() -> dict[str, Tensor]:
    """State of a TinyLM fine-tuned on every fact (forget and retain) until it knows them."""
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batch = collate(FORGET + RETAIN, PAD)
    labels = batch.pop("labels")
    for _ in range(100):
        loss, _ = answer_nll(model(**batch).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return copy.deepcopy(model.state_dict())


def fresh(state: dict[str, Tensor]) -> TinyLM:
    model = TinyLM()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def nll(model: nn.Module, examples: list[dict[str, Tensor]]) -> float:
    """Cross-entropy per answer token, computed as HF does (an independent check of ``answer_nll``)."""
    batch = collate(examples, PAD)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX).item()


@torch.no_grad()
def logprob(model: nn.Module, examples: list[dict[str, Tensor]]) -> Tensor:
    batch = collate(examples, PAD)
    labels = batch.pop("labels")
    return answer_logprob(model(**batch).logits, labels)


def run(method: str, model: nn.Module, data: UnlearnData = DATA, config: FinetuneConfig = CONFIG):
    return FINETUNE_METHODS[method](config).run(model, None, data, log=lambda _: None)


def test_the_starting_model_knows_both_sets(learned):
    model = fresh(learned)
    assert nll(model, FORGET) < 0.05
    assert nll(model, RETAIN) < 0.05


@pytest.mark.parametrize("method", sorted(FINETUNE_METHODS))
def test_run_raises_forget_nll_and_reports(method, learned):
    model = fresh(learned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forget_before = nll(model, FORGET)
    model.modes.clear()
    summary = run(method, model)
    assert model.modes and all(model.modes), "a forward ran in eval mode during training"
    assert nll(model, FORGET) > forget_before + 2.0  # at least e^-2 less likely per answer token
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert summary.method == method == FINETUNE_METHODS[method].name
    assert summary.steps == CONFIG.steps
    assert summary.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert [p["step"] for p in summary.curve] == [1, 10, 20, 30]
    assert all(math.isfinite(v) for point in summary.curve for v in point.values())
    assert summary.curve[-1]["forget_nll"] > summary.curve[0]["forget_nll"]
    # Trained in train mode, handed back in eval mode with its grad flags and no leftover gradients.
    assert model.modes[-1] is False and all(model.modes[:-1]), "forward ran in eval mode during training"
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_first_logged_losses_follow_the_formulas(learned):
    """At step 1 the model is still the reference: NPO's loss is (2/beta) log 2 and KL_Min's KL is 0."""
    curves = {m: run(m, fresh(learned)).curve for m in FINETUNE_METHODS}
    first = {m: c[0] for m, c in curves.items()}
    assert first["npo"]["loss"] == pytest.approx(2 / CONFIG.beta * math.log(2), rel=1e-6)
    assert first["npo"]["log_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl_min"]["retain_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl_min"]["loss"] == pytest.approx(-first["kl_min"]["forget_nll"], abs=1e-6)
    for point in curves["ga"]:
        assert point["loss"] == pytest.approx(-point["forget_nll"])
    for point in curves["ga_diff"]:
        assert point["loss"] == pytest.approx(-point["forget_nll"] + CONFIG.retain_weight * point["retain_nll"])
    assert curves["kl_min"][-1]["retain_kl"] > 0  # the model moved away from its frozen copy
    assert curves["npo"][-1]["log_ratio"] < 0


@pytest.mark.parametrize("method", ["ga_diff", "kl_min"])
def test_retain_term_protects_the_retain_set(method, learned):
    """Summed over three batch orders (one order can be lucky): GA hurts the retain set, the retain terms much less.

    KL_Min protects less than GA_Diff (its KL has zero gradient until the model has drifted), hence loose bounds.
    """
    start = fresh(learned)
    forget0, retain0 = nll(start, FORGET), nll(start, RETAIN)
    ga_damage = forget_rise = retain_rise = 0.0
    for seed in range(3):
        config = FinetuneConfig(steps=CONFIG.steps, lr=CONFIG.lr, batch_size=CONFIG.batch_size, seed=seed)
        ga, model = fresh(learned), fresh(learned)
        run("ga", ga, config=config)
        run(method, model, config=config)
        ga_damage += nll(ga, RETAIN) - retain0
        forget_rise += nll(model, FORGET) - forget0
        retain_rise += nll(model, RETAIN) - retain0
    assert ga_damage > 3.0, "the test setup no longer lets plain GA damage the retain set"
    assert forget_rise > 6.0
    assert retain_rise < 0.2 * forget_rise
    assert retain_rise < 0.3 * ga_damage


def test_npo_moves_every_forget_log_ratio_negative(learned):
    model = fresh(learned)
    reference = logprob(model, FORGET)
    run("npo", model)
    log_ratio = logprob(model, FORGET) - reference  # [n_forget]
    assert (log_ratio < -1.0).all()


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_forget_only_methods_ignore_the_retain_set(method, learned):
    """The research code's NPO iterated the retain set (defect 8): here the retain set changes nothing."""
    with_retain, without = fresh(learned), fresh(learned)
    run(method, with_retain, DATA)
    run(method, without, UnlearnData(forget=FORGET, retain=(), pad_token_id=PAD))
    for (name, a), b in zip(with_retain.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["ga_diff", "kl_min"])
def test_empty_retain_set_is_rejected(method, learned):
    model = fresh(learned)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match="retain set is empty.*'ga' or 'npo'"):
        run(method, model, UnlearnData(forget=FORGET, retain=(), pad_token_id=PAD))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", sorted(FINETUNE_METHODS))
def test_fixed_seed_is_deterministic(method, learned):
    a, b, c = fresh(learned), fresh(learned), fresh(learned)
    summary_a = run(method, a)
    torch.manual_seed(123)  # the method seeds torch itself
    summary_b = run(method, b)
    run(method, c, config=FinetuneConfig(steps=CONFIG.steps, lr=CONFIG.lr, batch_size=CONFIG.batch_size, seed=1))
    assert summary_a.curve == summary_b.curve
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters(), strict=True))


def test_only_parameters_that_require_grad_train(learned):
    model = fresh(learned)
    model.embed.requires_grad_(False)
    embed = model.embed.weight.detach().clone()
    head = model.head.weight.detach().clone()
    summary = run("kl_min", model)
    assert torch.equal(model.embed.weight, embed)
    assert not torch.equal(model.head.weight, head)
    assert not model.embed.weight.requires_grad and model.head.weight.requires_grad
    assert summary.trainable_parameters == sum(p.numel() for p in model.parameters()) - embed.numel()


def test_frozen_model_is_rejected(learned):
    model = fresh(learned).requires_grad_(False)
    with pytest.raises(InputError, match="requires grad"):
        run("ga", model)


@pytest.mark.parametrize("method", sorted(FINETUNE_METHODS))
def test_non_finite_loss_raises_with_step_and_hint(method, learned):
    model = fresh(learned)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"at step 1; lower FinetuneConfig\.lr"):
        run(method, model)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", sorted(FINETUNE_METHODS))
def test_multimodal_batches_reach_the_vision_tower(method):
    """On the toy VLM, images go through: forgetting image-conditioned answers changes the vision weights."""
    model, adapter = toy()
    patches = [[[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]], [[-0.4, 0.2, 0.7], [0.1, -0.3, 0.2]]]
    forget = [toy_example([1, IMAGE, 2, 3], 1, image=img) for img in patches]
    retain = [toy_example([1, 2, 4], 1), toy_example([2, 1, 4], 1)]
    data = UnlearnData(forget=forget, retain=retain, pad_token_id=PAD, forget_modality=("multimodal",) * 2,
                       retain_modality=("text",) * 2)
    vision = model.vision[0].mlp.fc1.weight.detach().clone()
    before = logprob(model, forget).sum()
    summary = FINETUNE_METHODS[method](FinetuneConfig(steps=5, lr=1e-2, batch_size=2)).run(
        model, adapter, data, graph=None, log=lambda _: None)
    assert logprob(model, forget).sum() < before
    assert not torch.equal(model.vision[0].mlp.fc1.weight, vision)
    assert summary.steps == 5


# --------------------------------------------------------------------------------------------- loss terms

def test_answer_nll_matches_cross_entropy_on_answer_tokens():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 9)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 4:] = torch.tensor([1, 2])
    labels[1, 2:5] = torch.tensor([3, 4, 5])
    labels[2, 5] = 8
    mean, per_row = answer_nll(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert mean.item() == pytest.approx(expected.item(), rel=1e-6)
    assert per_row.tolist() == pytest.approx(answer_logprob(logits, labels).tolist())


def test_answer_kl_is_kl_ref_to_current_on_answer_positions_only():
    torch.manual_seed(2)
    logits, ref = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3:] = torch.tensor([1, 2])  # predicted at positions 2, 3
    labels[1, 4] = 6  # predicted at position 3
    positions = [(0, 2), (0, 3), (1, 3)]
    expected = sum(torch.distributions.kl_divergence(torch.distributions.Categorical(logits=ref[r, t]),
                                                     torch.distributions.Categorical(logits=logits[r, t])).item()
                   for r, t in positions) / len(positions)
    assert answer_kl(logits, ref, labels).item() == pytest.approx(expected, rel=1e-5)
    assert answer_kl(logits, ref, labels).item() != pytest.approx(answer_kl(ref, logits, labels).item(), rel=1e-3)
    moved = logits.clone()
    moved[:, :2] += 5 * torch.randn(2, 2, 7)  # positions that predict no answer token
    moved[1, 2] += 5
    assert answer_kl(moved, ref, labels).item() == pytest.approx(expected, rel=1e-5)
    assert answer_kl(ref, ref, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_npo_loss_formula_and_gradient_weights():
    beta = 0.5
    log_ratio = torch.tensor([0.0, -3.0, 2.0, -20.0], requires_grad=True)
    loss = npo_loss(log_ratio, beta)
    expected = 2 / beta * sum(math.log1p(math.exp(beta * r)) for r in log_ratio.tolist()) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dr_i = (2 / n) * sigmoid(beta * r_i): GA's gradient, weighted down once an answer is already unlikely.
    weights = [2 / 4 / (1 + math.exp(-beta * r)) for r in log_ratio.tolist()]
    assert log_ratio.grad.tolist() == pytest.approx(weights, rel=1e-5)
    assert npo_loss(torch.zeros(3), 0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)


# --------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize(("field", "value"), [
    ("steps", 0), ("steps", 1.5), ("batch_size", 0), ("lr", 0.0), ("lr", -1e-4), ("lr", float("nan")),
    ("beta", 0.0), ("clip_norm", 0.0), ("retain_weight", -1.0), ("retain_weight", float("inf")), ("seed", -1),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(InputError, match=rf"FinetuneConfig\.{field}="):
        FinetuneConfig(**{field: value})


def test_registry_and_defaults():
    assert FINETUNE_METHODS == {"ga": GradientAscent, "ga_diff": GradientDifference, "kl_min": KLMinimization,
                                "npo": NPO}
    assert FinetuneConfig(retain_weight=0.0).retain_weight == 0.0
    assert all(cls().config == FinetuneConfig() for cls in FINETUNE_METHODS.values())
