"""Benchmark evaluation: exact multiple choice, ROUGE-L generation, forgetting rate and retention."""

from mip_core.evaluation.metrics import forgetting_rate, generation_match, mc_correct, retention, rouge_l
from mip_core.evaluation.report import format_table, read_json, to_json, write_json
from mip_core.evaluation.runner import (SPLITS, EvalRow, answer_confidence, answer_logprobs, answer_mean_logprobs,
                                        evaluate, probe_answers, score_items)

__all__ = ["SPLITS", "EvalRow", "answer_confidence", "answer_logprobs", "answer_mean_logprobs", "evaluate",
           "forgetting_rate", "format_table", "generation_match", "mc_correct", "probe_answers", "read_json",
           "retention", "rouge_l", "score_items", "to_json", "write_json"]
