"""Metric functions on hand-made cases."""

from __future__ import annotations

import math

import pytest

from mip_core.evaluation import EvalRow, forgetting_rate, format_table, mc_correct, retention, rouge_l
from mip_core.evaluation.metrics import guess_tail
from mip_core.evaluation.runner import relative_rows


def test_rouge_l_hand_cases():
    assert rouge_l("Lisbon", "Lisbon") == 1.0
    assert rouge_l("lisbon!", "Lisbon") == 1.0  # lower-cased, punctuation dropped
    assert rouge_l("Porto", "Lisbon") == 0.0
    # LCS("a marine biologist", "a biologist") = 2 tokens: P = 2/2, R = 2/3, F = 0.8
    assert rouge_l("a biologist", "a marine biologist") == pytest.approx(0.8)
    assert rouge_l("", "Lisbon") == 0.0


def test_mc_correct():
    assert mc_correct([-3.0, -0.1, -5.0, -2.0], 1)
    assert not mc_correct([-3.0, -0.1, -5.0, -2.0], 0)
    assert not mc_correct([-1.0, -1.0, -1.0, -1.0], 2)  # ties never favour the answer unless it comes first


def test_forgetting_rate_and_retention():
    assert forgetting_rate(0.8, 0.2) == pytest.approx(0.75)
    assert forgetting_rate(0.5, 0.5) == 0.0
    assert retention(0.8, 0.6) == pytest.approx(0.75)
    assert math.isnan(retention(0.0, 0.3))


def test_relative_rows_pair_with_reference():
    ref = [EvalRow("forget", "text", "mc", "accuracy", 0.9, 10), EvalRow("retain", "text", "mc", "accuracy", 0.8, 90)]
    now = [EvalRow("forget", "text", "mc", "accuracy", 0.45, 10), EvalRow("retain", "text", "mc", "accuracy", 0.6, 90)]
    rel = {(r.split, r.metric): r.value for r in relative_rows(now, ref)}
    assert rel == {("forget", "forgetting_rate"): pytest.approx(0.5), ("retain", "retention"): pytest.approx(0.75)}


def test_table_lists_every_split_and_modality():
    rows = [EvalRow(s, m, t, "accuracy" if t == "mc" else "rougeL", 0.5, 4)
            for s in ("forget", "retain") for m in ("multimodal", "text") for t in ("mc", "gen")]
    table = format_table(rows)
    assert table.count("\n") == 5 and "retain   text" in table and "0.500" in table


def test_guess_tail_is_the_chance_of_guessing_at_least_as_many_right():
    quarter = [(True, 0.25)] * 3 + [(False, 0.25)]
    assert guess_tail(quarter) == pytest.approx(13 / 256)  # 3 or 4 of 4: 4 (1/4)^3 (3/4) + (1/4)^4
    assert guess_tail([(True, 0.25), (False, 0.25), (False, 0.25), (False, 0.25)]) == pytest.approx(1 - (3 / 4) ** 4)
    assert guess_tail([(False, 0.25)] * 5) == guess_tail([]) == 1.0  # nothing right: guessing always does as well
    # mixed options: 1 of (1/2, 1/4) right is guessed with 1 - (1/2)(3/4) = 5/8, whichever item it is
    assert guess_tail([(True, 0.5), (False, 0.25)]) == guess_tail([(False, 0.5), (True, 0.25)]) == pytest.approx(5 / 8)
    assert guess_tail([(True, 0.0), (False, 0.0)]) == 0.0  # free-form answers said again are never guessed
    assert guess_tail([(True, 0.0), (False, 0.25)]) == 0.25  # a count: guessing gets one right as often as that
