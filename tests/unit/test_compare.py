"""Pure parts of `mip compare`: selectivity, summaries over seeds, paired differences, the table, MIA AUC."""

from __future__ import annotations

import math

import pytest

from mip_core.compare import (
    CompareConfig,
    CompareRow,
    format_compare,
    format_paired,
    harmonic_mean,
    paired_comparison,
    paired_differences,
    selectivity_rows,
    summarize,
)
from mip_core.errors import InputError
from mip_core.evaluation.mia import auc
from mip_core.evaluation.runner import EvalRow


def test_harmonic_mean_clips_rates_and_needs_both():
    assert harmonic_mean(1.0, 1.0) == 1.0
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic_mean(-0.2, 0.9) == 0.0  # a negative forgetting rate forgets nothing
    assert harmonic_mean(1.0, 0.0) == 0.0


def test_selectivity_rows_per_modality():
    rows = [EvalRow("forget", "text", "mc", "forgetting_rate", 0.8, 25), EvalRow("retain", "text", "mc", "retention",
                                                                                0.9, 475),
            EvalRow("forget", "multimodal", "mc", "forgetting_rate", 0.5, 30)]  # no retain row: no HM
    out = selectivity_rows(rows)
    assert [(r.split, r.modality, r.metric) for r in out] == [("overall", "text", "hm")]
    assert out[0].value == pytest.approx(2 * 0.8 * 0.9 / 1.7)


def _rows(method: str, values: list[float]) -> list[CompareRow]:
    return [CompareRow(method, seed, "overall", m, "mc", "hm", v, 10) for seed, v in enumerate(values)
            for m in ("multimodal", "text")]


def test_summarize_gives_mean_and_sample_std_over_seeds():
    summary = {(s.method, s.modality): s for s in summarize(_rows("mip", [0.7, 0.8, 0.9]))}
    s = summary[("mip", "text")]
    assert s.mean == pytest.approx(0.8) and s.std == pytest.approx(0.1) and s.n_seeds == 3
    one = summarize(_rows("mip", [0.7]))[0]
    assert one.std == 0.0 and one.n_seeds == 1


def test_paired_differences_match_seeds():
    rows = _rows("mip", [0.7, 0.8, 0.9]) + _rows("random", [0.75, 0.7, 0.95])
    diff = paired_differences(rows, "mip", "random")
    assert diff["text"] == pytest.approx([-0.05, 0.1, -0.05])


def test_paired_comparison_counts_a_win_only_beyond_the_spread():
    rows = (_rows("mip", [0.80, 0.82, 0.84]) + _rows("random", [0.70, 0.72, 0.74])
            + _rows("rmu", [0.79, 0.81, 0.85]) + _rows("noisy", [0.60, 0.95, 0.70]))
    vs_random = {c.modality: c for c in paired_comparison(rows, "mip", "random")}["text"]
    assert vs_random.diffs == pytest.approx((0.1, 0.1, 0.1)) and vs_random.wins == 3
    assert vs_random.spread == pytest.approx(0.02) and vs_random.beyond_spread
    vs_rmu = paired_comparison(rows, "mip", "rmu")[0]  # +0.01, +0.01, -0.01: not ahead on every subset
    assert vs_rmu.wins == 2 and not vs_rmu.beyond_spread
    vs_noisy = paired_comparison(rows, "mip", "noisy")[0]  # ahead on 2 of 3 and inside the noisy method's spread
    assert vs_noisy.mean > 0 and not vs_noisy.beyond_spread
    assert not paired_comparison(_rows("mip", [0.9]) + _rows("random", [0.1]), "mip", "random")[0].beyond_spread
    import numpy as np  # values straight from torch/numpy metrics must work too

    mixed = [CompareRow(r.method, r.seed, r.split, r.modality, r.task, r.metric,
                        np.float64(r.value) if r.seed else r.value, r.n) for r in rows]
    assert paired_comparison(mixed, "mip", "random")[0].wins == 3
    text = format_paired(rows, "mip", ["random", "rmu", "absent"])
    assert text.count("ahead beyond the spread") == 2 and "absent" not in text and "2/3" in text


def test_table_has_one_row_per_method_and_modality_blocks():
    rows = _rows("vanilla", [0.0, 0.0]) + _rows("mip", [0.7, 0.9])
    text = format_compare(summarize(rows))
    assert text.count("mip ") == 2 and "0.800+-0.141" in text and "over 2 forget subsets" in text


def test_compare_config_rejects_unknown_methods_and_seeds():
    with pytest.raises(InputError, match=r"CompareConfig.methods\[1\]='magic'"):
        CompareConfig(methods=("mip", "magic"))
    with pytest.raises(InputError, match="seeds"):
        CompareConfig(seeds=0)


def test_auc_is_the_mann_whitney_probability():
    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auc([1.0], [1.0]) == 0.5
    assert math.isclose(auc([1.0, 3.0], [2.0]), 0.5)
    with pytest.raises(InputError):
        auc([], [1.0])


def test_distance_to_the_gold_model_by_hand():
    from mip_core.compare import gold_distance

    edited = [EvalRow("forget", "text", "mc", "accuracy", 0.30, 20), EvalRow("retain", "text", "mc", "accuracy", 0.85, 40),
              EvalRow("retain", "text", "gen", "rougeL", 0.70, 40), EvalRow("forget", "text", "mia", "mia_auc", 0.40, 20),
              EvalRow("forget", "text", "mc", "forgetting_rate", 0.7, 20),  # relative to vanilla: no gold distance
              EvalRow("utility", "text", "mc", "accuracy", 0.9, 10)]  # the gold model has no utility row here
    gold = [EvalRow("forget", "text", "mc", "accuracy", 0.25, 20), EvalRow("retain", "text", "mc", "accuracy", 0.95, 40),
            EvalRow("retain", "text", "gen", "rougeL", 0.80, 40), EvalRow("forget", "text", "mia", "mia_auc", 0.50, 20)]
    out = {(r.split, r.task, r.metric): r.value for r in gold_distance(edited, gold)}
    assert out == pytest.approx({("forget", "mc", "accuracy_minus_gold"): 0.05,
                                 ("retain", "mc", "accuracy_minus_gold"): -0.10,
                                 ("retain", "gen", "rougeL_minus_gold"): -0.10,
                                 ("forget", "mia", "privacy_leak"): -0.20})  # (0.40 - 0.50) / 0.50: "too forgotten"
    assert gold_distance(edited, []) == []


def test_a_gold_model_must_have_been_trained_without_exactly_the_forget_people(tmp_path):
    import json

    from mip_core.compare import check_gold

    (tmp_path / "training_log.json").write_text(json.dumps({"config": {"exclude_profiles": ["p001", "p002"]}}))
    check_gold(str(tmp_path), frozenset({"p001", "p002"}), "CompareConfig.gold[0]", "--exclude-forget 5")
    with pytest.raises(InputError, match=r"CompareConfig.gold\[0\]=.* trained without 2 people .* not the 3 .*"
                                         r"mip vanilla ... --exclude-forget 5"):
        check_gold(str(tmp_path), frozenset({"p001", "p002", "p003"}), "CompareConfig.gold[0]", "--exclude-forget 5")
    (tmp_path / "training_log.json").unlink()  # a model without a training log (not trained here) is no gold model
    with pytest.raises(InputError, match="trained without 0 people"):
        check_gold(str(tmp_path), frozenset({"p001"}), "CompareConfig.gold[0]", "--exclude-forget 5")


def test_the_gold_table_is_printed_only_with_gold_rows():
    rows = [CompareRow("vanilla", 0, "forget", "text", "mc", "accuracy", 0.9, 20),
            CompareRow("mip", 0, "forget", "text", "mc", "accuracy", 0.3, 20)]
    assert "gold" not in format_compare(summarize(rows))
    rows += [CompareRow("gold", 0, "forget", "text", "mc", "accuracy", 0.25, 20),
             CompareRow("mip", 0, "forget", "text", "mc", "accuracy_minus_gold", 0.05, 20)]
    text = format_compare(summarize(rows))
    gold_table = text[text.index("minus the gold model"):]
    assert "0.050" in gold_table and "\ngold " not in gold_table  # the gold model's own row is not a distance


def test_compare_needs_one_gold_model_per_forget_subset():
    from mip_core.compare import compare

    with pytest.raises(InputError, match="gold has 1 models for 2 forget subsets"):
        compare(None, None, CompareConfig(seeds=2, gold=("g0",)))
