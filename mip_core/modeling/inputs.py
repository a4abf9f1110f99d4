"""Turn (question, image, answer) into model inputs through the model's own processor and chat template.

Nothing here depends on the architecture: the processor expands image placeholders and the chat template frames
the turn. Examples are encoded once, unbatched, and collated later, so training never re-runs the processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from mip_core.errors import InputError

#: Keys that hold one value per token; every other key holds rows per image and is concatenated on dim 0.
SEQUENCE_KEYS = frozenset({"input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids"})
IGNORE_INDEX = -100


def prompt_text(processor: Any, question: str, has_image: bool) -> str:
    """The user turn (with an image placeholder when ``has_image``) and the assistant prefix."""
    content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def encode(processor: Any, question: str, image: Image.Image | None = None, answer: str | None = None,
           *, item_id: str = "?") -> dict[str, Tensor]:
    """Encode one example. With ``answer``, appends ``answer + eos`` and sets ``labels`` on those tokens only.

    Returns unbatched tensors: ``input_ids``/``attention_mask``/``labels`` ``[seq]``, image tensors as the
    processor shapes them for one image (e.g. ``pixel_values`` ``[n_patches, patch_dim]`` or ``[1, 3, H, W]``).
    """
    prompt = prompt_text(processor, question, image is not None)
    tokenizer = processor.tokenizer
    text = prompt if answer is None else prompt + answer + tokenizer.eos_token
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image]
    batch = processor(**kwargs)
    out = {k: (v[0] if k in SEQUENCE_KEYS else v) for k, v in batch.items()}
    if answer is not None:
        if not answer.strip():
            raise InputError(f"item {item_id}: empty answer; every item needs a non-empty answer span")
        n_prompt = len(processor(**{**kwargs, "text": [prompt]})["input_ids"][0])
        labels = out["input_ids"].clone()
        labels[:n_prompt] = IGNORE_INDEX
        if (labels != IGNORE_INDEX).sum() == 0:
            raise InputError(f"item {item_id}: the answer {answer!r} encodes to no tokens after the prompt")
        out["labels"] = labels
    return out


def collate(examples: Sequence[dict[str, Tensor]], pad_token_id: int, *, padding_side: str = "right"
            ) -> dict[str, Tensor]:
    """Pad per-token tensors to the longest example; concatenate per-image tensors in example order.

    Right padding keeps every example's positions as if it ran alone (training, scoring); generation needs left
    padding so that all rows end at the same position.
    """
    length = max(int(e["input_ids"].shape[0]) for e in examples)
    out: dict[str, Tensor] = {}
    keys = dict.fromkeys(k for e in examples for k in e)  # text-only examples have no image keys
    for key in keys:
        values = [e[key] for e in examples if key in e]
        if key in SEQUENCE_KEYS:
            fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            padded = torch.full((len(values), length), fill, dtype=values[0].dtype)
            for row, v in enumerate(values):
                n = v.shape[0]
                if padding_side == "right":
                    padded[row, :n] = v
                else:
                    padded[row, length - n:] = v
            out[key] = padded
        else:
            out[key] = torch.cat(values, dim=0)
    return out


def answer_positions(labels: Tensor) -> Tensor:
    """The sequence positions whose logits predict an answer token in some row, ``[K]`` long, ascending.

    Passed to a model's ``logits_to_keep``, the LM head then projects only these positions onto the vocabulary:
    the same answer log-probability, without the ``[R, S, V]`` logits (about 1.5 GB for 16 rows of 300 tokens at
    a 152k vocabulary in bf16) or their backward.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def answer_logprob(logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
    """``F = log p(answer | prompt)`` per row: the summed log-probability of the labelled tokens, in float32.

    The one objective of the project: multiple-choice scoring ranks options by it, attribution differentiates it.

    Args: ``logits`` ``[R, S, V]``, ``labels`` ``[R, S]`` (``IGNORE_INDEX`` off the answer span); with
    ``positions`` (``answer_positions``), ``logits`` is ``[R, K, V]``, the logits at those positions only.
    Returns ``[R]``. Token ``t + 1`` is predicted at position ``t``.
    """
    labels = labels.to(logits.device)  # a model placed on GPUs returns its logits there; batches are built on CPU
    if positions is None:
        logits, targets = logits[:, :-1], labels[:, 1:]  # [R, S-1, V], [R, S-1]
    else:
        targets = labels[:, positions.to(labels.device) + 1]  # [R, K]
    is_answer = targets != IGNORE_INDEX
    # Normalise the answer positions only: [n_answer, V] rather than [R, S-1, V] (large vocabularies).
    logprobs = logits[is_answer].float().log_softmax(-1)  # [n_answer, V]
    picked = logprobs.gather(-1, targets[is_answer].unsqueeze(-1)).squeeze(-1)  # [n_answer]
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[is_answer]
    return picked.new_zeros(labels.shape[0]).index_add(0, rows, picked)


def inputs_follow_model(model: nn.Module) -> None:
    """Move a forward's tensor arguments to the device of the model's first weights.

    The evaluation code builds its batches on the CPU; a model on one GPU has no accelerate hooks to move them
    (on several GPUs, under a device map, the hooks take them on from the first device).
    """
    device = next(model.parameters()).device

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    model.register_forward_pre_hook(hook, with_kwargs=True)
