"""A byte-level BPE tokenizer trained locally (no hub): any text encodes, the benchmark's words encode compactly."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def train_tokenizer(corpus: Iterable[str], special_tokens: Sequence[str], *, pad_token: str, eos_token: str,
                    image_token: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus``; ``special_tokens`` get ids ``0..n-1`` in the given order."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(sorted(set(corpus)), trainer)  # sorted: same corpus, same merges, same ids
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=pad_token, eos_token=eos_token,
                                        extra_special_tokens={"image_token": image_token})
    return tokenizer
