"""Build a tiny, randomly initialised MLLM of a supported architecture, with a locally trained tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mip_core.adapters import TINY_SIZES, adapter_class
from mip_core.errors import InputError
from mip_core.modeling.tokenizer import train_tokenizer


def build_tiny(arch: str, *, size: str = "demo", seed: int = 0, corpus: Iterable[str] | None = None
               ) -> tuple[nn.Module, Any]:
    """A random ``arch`` model of ``size`` and its complete processor.

    The tokenizer is trained on ``corpus`` (default: every template and word the benchmark generator can emit).
    """
    cls = adapter_class(arch)
    if size not in TINY_SIZES:
        raise InputError(f"size {size!r} is unknown; choose one of {', '.join(TINY_SIZES)}")
    dims = TINY_SIZES[size]
    if corpus is None:
        from mip_core.benchmark import corpus_for_tokenizer

        corpus = corpus_for_tokenizer()
    tokenizer = train_tokenizer(corpus, cls.special_tokens, pad_token=cls.pad_token, eos_token=cls.eos_token,
                                image_token=cls.image_token)
    processor = cls.build_processor(tokenizer, dims)
    config = cls.tiny_config(dims, tokenizer)
    torch.manual_seed(seed)
    model = cls.model_class(config)
    model.eval()
    return model, processor
