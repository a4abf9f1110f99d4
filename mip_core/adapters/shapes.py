"""Published checkpoints' shapes, and scaled-down variants of them, as configs without weights.

Why here: no hub is reachable, yet the 70B path must be checked against the real shapes (site counts, neuron
counts, memory per stage) and benchmarked at sizes between the tiny demo models and the real ones. Only the
adapters may name architectures, so the shapes live here; ``mip_core.modeling.shapes`` is the generic door to
them (named shapes, scaled configs, parameter counts on the meta device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PretrainedConfig, Qwen2_5_VLConfig

from mip_core.adapters import _qwen
from mip_core.errors import InputError

#: Special-token ids of the published Qwen2-VL / Qwen2.5-VL tokenizer (vocabulary 152064).
QWEN_TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
                  "vision_start_token_id": 151652, "vision_end_token_id": 151653,
                  "image_token_id": 151655, "video_token_id": 151656}
QWEN_VOCAB = 152064
PATCH, MERGE = 14, 2  # the published vision tower: 14-pixel patches merged 2x2 into one LLM token


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of the rotary half-dimension over (time, height, width): [16, 24, 24] at head_dim 128."""
    half = head_dim // 2
    time = half // 4
    height = (half - time) // 2
    return [time, height, half - time - height]


def _kv_heads(heads: int) -> int:
    """About one KV head per 7-8 query heads, as published (64 -> 8, 28 -> 4, 14 -> 2); a divisor of ``heads``."""
    return max(d for d in range(1, max(1, heads // 7) + 1) if heads % d == 0)


def _token_ids(vocab: int, tokenizer: Any) -> dict[str, int]:
    """The tokenizer's ids; else the published ids when they fit in ``vocab``, else a local tokenizer's (0..6)."""
    if tokenizer is None and vocab > max(QWEN_TOKEN_IDS.values()):
        return dict(QWEN_TOKEN_IDS)
    local = {tok: i for i, tok in enumerate(_qwen.QWEN_SPECIAL_TOKENS)}  # train_tokenizer's fixed order
    idx = tokenizer.convert_tokens_to_ids if tokenizer is not None else local.__getitem__
    names = {"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
             "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
    return {key: int(idx(token)) for key, token in names.items()}


def scaled_qwen2_5_vl(hidden: int, intermediate: int, layers: int, vision_depth: int, vocab: int, *,
                      heads: int | None = None, kv_heads: int | None = None, vision_hidden: int = 1280,
                      vision_intermediate: int = 3456, vision_heads: int | None = None, tokenizer: Any = None,
                      dtype: str = "bfloat16") -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given widths and depths, otherwise laid out like the published checkpoints.

    Defaults follow the published models: 128-wide attention heads (64 below hidden 1024), about one KV head per
    7-8 query heads, 80-wide vision heads, 14-pixel patches merged 2x2, window attention with full attention
    every 8th vision block, untied embeddings. ``tokenizer`` (a locally trained one) supplies the special-token
    ids; without it the published ids are used when ``vocab`` holds them, else those of a local tokenizer.
    """
    heads = heads or max(1, hidden // (128 if hidden >= 1024 else 64))
    kv_heads = kv_heads or _kv_heads(heads)
    vision_heads = vision_heads or max(1, vision_hidden // 80 if vision_hidden % 80 == 0 else vision_hidden // 64)
    if hidden % heads or heads % kv_heads or (hidden // heads) % 8 or vision_hidden % vision_heads:
        raise InputError(f"hidden={hidden} needs heads ({heads}) dividing it into heads of a multiple of 8, "
                         f"kv_heads ({kv_heads}) dividing heads, vision_heads ({vision_heads}) dividing "
                         f"vision_hidden ({vision_hidden})")
    ids = _token_ids(vocab, tokenizer)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128000,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": mrope_section(hidden // heads)},
                **{k: ids.pop(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                  num_heads=vision_heads, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                  out_hidden_size=hidden, window_size=PATCH * MERGE * 4,  # 112: a multiple of patch * merge
                  fullatt_block_indexes=list(range(7, vision_depth, 8)) or [vision_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, dtype=dtype, **ids)


SHAPES: dict[str, Callable[[], PretrainedConfig]] = {
    # Qwen2.5-VL-72B-Instruct: 73.4 B parameters
    "qwen2_5_vl_72b": lambda: scaled_qwen2_5_vl(8192, 29568, 80, 32, QWEN_VOCAB, heads=64, kv_heads=8),
    # Qwen2.5-VL-7B-Instruct: 8.3 B parameters
    "qwen2_5_vl_7b": lambda: scaled_qwen2_5_vl(3584, 18944, 28, 32, QWEN_VOCAB, heads=28, kv_heads=4),
}
"""Named published shapes: name -> a function returning its config."""

SCALERS: dict[str, Callable[..., PretrainedConfig]] = {"qwen2_5_vl": scaled_qwen2_5_vl}
"""``model_type`` -> builder of a scaled config (``hidden, intermediate, layers, vision_depth, vocab, **opts``)."""
