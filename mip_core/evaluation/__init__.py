"""Benchmark evaluation: exact multiple choice, ROUGE-L generation, forgetting rate and retention."""

from mip_core.evaluation.metrics import forgetting_rate, mc_correct, retention, rouge_l
from mip_core.evaluation.report import format_table, read_json, to_json, write_json
from mip_core.evaluation.runner import SPLITS, EvalRow, evaluate

__all__ = ["SPLITS", "EvalRow", "evaluate", "forgetting_rate", "format_table", "mc_correct", "read_json",
           "retention", "rouge_l", "to_json", "write_json"]
