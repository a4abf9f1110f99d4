"""Metric functions on hand-made cases."""

from __future__ import annotations

import math

import pytest

from mip_core.evaluation import EvalRow, forgetting_rate, format_table, mc_correct, retention, rouge_l
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
