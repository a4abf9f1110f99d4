"""Qwen2-VL: SwiGLU MLPs in the language model, ``fc1 -> QuickGELU -> fc2`` MLPs in the packed vision tower."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from mip_core.adapters import _qwen
from mip_core.adapters.base import MLPLayout, ModelAdapter, TinySize
from mip_core.types import Tower


class Qwen2VLAdapter(ModelAdapter):
    model_type = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    special_tokens = _qwen.QWEN_SPECIAL_TOKENS
    pad_token, eos_token, image_token = "<|endoftext|>", "<|im_end|>", "<|image_pad|>"
    chat_template = _qwen.QWEN_CHAT_TEMPLATE

    @classmethod
    def tiny_config(cls, size: TinySize, tokenizer: Any) -> Qwen2VLConfig:
        vision = dict(
            depth=size.vision_depth, embed_dim=size.vision_width, hidden_size=size.hidden,
            mlp_ratio=size.vision_mlp // size.vision_width,  # fc1 width = embed_dim * mlp_ratio
            num_heads=size.vision_heads, patch_size=size.patch,
            spatial_merge_size=2, temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=_qwen.tiny_text_config(size, tokenizer), vision_config=vision,
                             tie_word_embeddings=False, **_qwen.token_ids(tokenizer))

    @classmethod
    def build_processor(cls, tokenizer: Any, size: TinySize) -> Any:
        return _qwen.ImageOnlyQwen2VLProcessor(_qwen.tiny_image_processor(size), tokenizer,
                                               chat_template=cls.chat_template)

    @classmethod
    def load_processor(cls, path: str) -> Any:
        # the subclass, whatever class the files name: the standard one needs torchvision (see _qwen)
        return _qwen.ImageOnlyQwen2VLProcessor.from_pretrained(path)

    @classmethod
    def standardize_processor_files(cls, folder: str) -> list[str]:
        return _qwen.standardize_saved_processor(folder, _qwen.ImageOnlyQwen2VLProcessor.STANDARD)

    def layouts(self, tower: Tower) -> tuple[MLPLayout, ...]:
        if tower == "vision":
            return (MLPLayout("model.visual.blocks.{i}.mlp", ("fc1",), "fc2"),
                    MLPLayout("visual.blocks.{i}.mlp", ("fc1",), "fc2"))
        gated = ("gate_proj", "up_proj")
        return (MLPLayout("model.language_model.layers.{i}.mlp", gated, "down_proj"),
                MLPLayout("model.layers.{i}.mlp", gated, "down_proj"))

    def n_layers(self, tower: Tower) -> int:
        if tower == "vision":
            return int(self.config.vision_config.depth)
        return int(self.config.text_config.num_hidden_layers)

    def split_vision_rows(self, activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
        return _qwen.split_packed_patches(activation, batch)

    def fixed_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _qwen.rope_position_ids(self.model, batch)
