"""Loss-based membership inference: can an attacker still tell forget items from never-seen ones?

Score of an item = minus its mean per-token negative log-likelihood of the answer (length-normalised, so long
names do not look "unseen"). The AUC is the probability that a forget item scores higher than a never-seen
item (Mann-Whitney, ties counted half). A model that knows the forget set gives about 1.0; an unlearned model
that treats the forgotten people like strangers gives about 0.5; well below 0.5 is itself a tell.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mip_core.errors import InputError
from mip_core.evaluation.runner import sequence_logprobs
from mip_core.modeling.inputs import IGNORE_INDEX


def mean_answer_logprob(model: nn.Module, examples: Sequence[dict[str, Tensor]], pad_token_id: int,
                        batch_size: int = 64, device: torch.device | None = None) -> list[float]:
    """Per example: log p(answer | prompt) divided by the number of answer tokens (``device``: as
    ``sequence_logprobs``)."""
    model.eval()
    totals = sequence_logprobs(model, examples, pad_token_id, batch_size, device=device)
    n_tokens = [max(1, int((ex["labels"][1:] != IGNORE_INDEX).sum())) for ex in examples]
    return [total / n for total, n in zip(totals, n_tokens, strict=True)]


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """P(member score > non-member score) + 0.5 P(equal): the ROC AUC of "higher score = member"."""
    if not members or not non_members:
        raise InputError(f"an AUC needs both members ({len(members)}) and non-members ({len(non_members)})")
    m = torch.tensor(list(members), dtype=torch.float64).unsqueeze(1)
    n = torch.tensor(list(non_members), dtype=torch.float64).unsqueeze(0)
    return float(((m > n).double() + 0.5 * (m == n).double()).mean())


def mia_auc(model: nn.Module, members: Sequence[dict[str, Tensor]], non_members: Sequence[dict[str, Tensor]],
            pad_token_id: int, batch_size: int = 64) -> float:
    """Loss-based membership-inference AUC of ``members`` (forget items) against ``non_members`` (never seen)."""
    return auc(mean_answer_logprob(model, members, pad_token_id, batch_size),
               mean_answer_logprob(model, non_members, pad_token_id, batch_size))


__all__ = ["auc", "mean_answer_logprob", "mia_auc"]
