"""Qwen2.5-VL: gated (SwiGLU) MLPs in both towers; the vision tower runs on a packed patch sequence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mip_core.adapters import _qwen
from mip_core.adapters.base import MLPLayout, ModelAdapter, TinySize
from mip_core.types import Tower

GATED = ("gate_proj", "up_proj")


class Qwen25VLAdapter(ModelAdapter):
    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    special_tokens = _qwen.QWEN_SPECIAL_TOKENS
    pad_token, eos_token, image_token = "<|endoftext|>", "<|im_end|>", "<|image_pad|>"
    chat_template = _qwen.QWEN_CHAT_TEMPLATE

    @classmethod
    def tiny_config(cls, size: TinySize, tokenizer: Any) -> Qwen2_5_VLConfig:
        merge = 2
        vision = dict(
            depth=size.vision_depth, hidden_size=size.vision_width, intermediate_size=size.vision_mlp,
            num_heads=size.vision_heads, patch_size=size.patch, spatial_merge_size=merge, temporal_patch_size=2,
            out_hidden_size=size.hidden, window_size=size.patch * merge * 2,  # a multiple of patch * merge
            fullatt_block_indexes=[size.vision_depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=_qwen.tiny_text_config(size, tokenizer), vision_config=vision,
                                tie_word_embeddings=False, **_qwen.token_ids(tokenizer))

    @classmethod
    def build_processor(cls, tokenizer: Any, size: TinySize) -> Any:
        return _qwen.ImageOnlyQwen2_5_VLProcessor(_qwen.tiny_image_processor(size), tokenizer,
                                                  chat_template=cls.chat_template)

    @classmethod
    def load_processor(cls, path: str) -> Any:
        # the subclass, whatever class the files name: the standard one needs torchvision (see _qwen)
        return _qwen.ImageOnlyQwen2_5_VLProcessor.from_pretrained(path)

    @classmethod
    def standardize_processor_files(cls, folder: str) -> list[str]:
        return _qwen.standardize_saved_processor(folder, _qwen.ImageOnlyQwen2_5_VLProcessor.STANDARD)

    def layouts(self, tower: Tower) -> tuple[MLPLayout, ...]:
        if tower == "vision":
            return (MLPLayout("model.visual.blocks.{i}.mlp", GATED, "down_proj"),
                    MLPLayout("visual.blocks.{i}.mlp", GATED, "down_proj"))
        return (MLPLayout("model.language_model.layers.{i}.mlp", GATED, "down_proj"),
                MLPLayout("model.layers.{i}.mlp", GATED, "down_proj"))

    def n_layers(self, tower: Tower) -> int:
        if tower == "vision":
            return int(self.config.vision_config.depth)
        return int(self.config.text_config.num_hidden_layers)

    def split_vision_rows(self, activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
        return _qwen.split_packed_patches(activation, batch)

    def fixed_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _qwen.rope_position_ids(self.model, batch)
