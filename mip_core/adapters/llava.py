"""LLaVA: a CLIP (or SigLIP) vision tower with ``fc1/fc2`` MLPs, a projector, and a Llama or Qwen2 language model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from mip_core.adapters.base import MLPLayout, ModelAdapter, TinySize
from mip_core.types import Tower

# Vicuna-style single-turn format used by LLaVA-1.5 checkpoints.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

VISION_TOWER_PATHS = ("model.vision_tower.encoder.layers.{i}.mlp", "model.vision_tower.vision_model.encoder.layers.{i}.mlp",
                      "vision_tower.vision_model.encoder.layers.{i}.mlp")


class LlavaAdapter(ModelAdapter):
    model_type = "llava"
    model_class = LlavaForConditionalGeneration
    special_tokens = ("<pad>", "</s>", "<s>", "<image>")
    pad_token, eos_token, image_token = "<pad>", "</s>", "<image>"
    chat_template = LLAVA_CHAT_TEMPLATE

    @classmethod
    def tiny_config(cls, size: TinySize, tokenizer: Any) -> LlavaConfig:
        vision = CLIPVisionConfig(
            hidden_size=size.vision_width, intermediate_size=size.vision_mlp, num_hidden_layers=size.vision_depth,
            num_attention_heads=size.vision_heads, image_size=size.image_size, patch_size=size.patch,
            projection_dim=size.hidden,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.mlp,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
            max_position_embeddings=512, bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("</s>"), pad_token_id=tokenizer.convert_tokens_to_ids("<pad>"),
        )
        # vision_feature_layer=-1: with the default -2 the last vision block gets no gradient at all.
        return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                           image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)

    @classmethod
    def build_processor(cls, tokenizer: Any, size: TinySize) -> Any:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size.image_size}, crop_size={"height": size.image_size, "width": size.image_size},
        )
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=size.patch,
                              vision_feature_select_strategy="default", chat_template=cls.chat_template,
                              image_token="<image>", num_additional_image_tokens=1)

    @classmethod
    def load_processor(cls, path: str) -> Any:
        return LlavaProcessor.from_pretrained(path)

    def layouts(self, tower: Tower) -> tuple[MLPLayout, ...]:
        if tower == "vision":
            return tuple(MLPLayout(p, ("fc1",), "fc2") for p in VISION_TOWER_PATHS)
        gated = ("gate_proj", "up_proj")  # Llama and Qwen2 language models share this layout
        return (MLPLayout("model.language_model.layers.{i}.mlp", gated, "down_proj"),
                MLPLayout("language_model.model.layers.{i}.mlp", gated, "down_proj"))

    def n_layers(self, tower: Tower) -> int:
        if tower == "vision":
            return int(self.config.vision_config.num_hidden_layers)
        return int(self.config.text_config.num_hidden_layers)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_index)

    def split_vision_rows(self, activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
        # CLIP runs images as a batch: [n_images, 1 + n_patches, d_mlp] (the CLS row included).
        return list(activation.unbind(0))
