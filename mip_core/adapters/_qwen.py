"""Pieces shared by the two Qwen-VL adapters: the image-only processors and the tiny model's chat format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from mip_core.adapters.base import TinySize

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)

# ChatML, as Qwen checkpoints ship it, reduced to what the benchmark uses (text parts and images).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _init_image_only(self: Any, image_processor: Any, tokenizer: Any, chat_template: str | None) -> None:
    # The shipped processors require a video processor, which requires torchvision; we never feed video.
    self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
    self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
    ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (works without torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        _init_image_only(self, image_processor, tokenizer, chat_template)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (works without torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        _init_image_only(self, image_processor, tokenizer, chat_template)


def tiny_image_processor(size: TinySize) -> Qwen2VLImageProcessorPil:
    """Keeps a ``size.image_size`` square image at its size: ``(image/patch)^2`` patches, merged 2x2."""
    pixels = size.image_size * size.image_size
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=size.patch,
                                    merge_size=2, temporal_patch_size=2)


def load_image_processor(path: str) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil.from_pretrained(path)


def tiny_text_config(size: TinySize, tokenizer: Any) -> dict[str, Any]:
    head_dim = size.hidden // size.heads
    half = head_dim // 2  # M-RoPE splits the rotary half-dimension over (time, height, width)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.mlp,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": section},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def token_ids(tokenizer: Any) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids


def split_packed_patches(activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
    """Qwen's vision tower runs on one packed ``[sum_i t*h*w, d]`` patch sequence: split it by ``image_grid_thw``."""
    rows = activation.reshape(-1, activation.shape[-1])  # [n_patches_total, d_mlp]
    sizes = batch["image_grid_thw"].prod(dim=-1).tolist()
    if sum(sizes) != rows.shape[0]:
        raise ValueError(f"image_grid_thw accounts for {sum(sizes)} patches, activation has {rows.shape[0]}")
    return list(rows.split(sizes))
