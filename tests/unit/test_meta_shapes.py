"""Published shapes on the meta device: they build in a moment without weights, and every adapter site resolves.

The parameter counts are checked against a hand formula of the architecture (independent of the meta model),
and a small scaled config runs a real forward with an image, so its M-RoPE and window settings are valid.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mip_core.adapters import adapter_class, get_adapter
from mip_core.errors import InputError
from mip_core.modeling.shapes import SHAPE_NAMES, meta_model, param_count, scaled_config, shape_config
from mip_core.modeling.tokenizer import train_tokenizer

# name: (hidden, intermediate, layers, heads, kv_heads, vocab, vision depth, vision hidden, vision intermediate)
PUBLISHED = {
    "qwen2_5_vl_72b": (8192, 29568, 80, 64, 8, 152064, 32, 1280, 3456),
    "qwen2_5_vl_7b": (3584, 18944, 28, 28, 4, 152064, 32, 1280, 3456),
}


def rss_bytes() -> int:
    """This process's resident set now (/proc/self/statm), not its peak."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def hand_count(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, depth: int, v_hidden: int,
               v_inter: int) -> int:
    """Parameters of a Qwen2.5-VL, term by term (untied embeddings, biased q/k/v, gated MLPs, RMSNorms)."""
    kv_dim = kv * hidden // heads
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv_dim + kv_dim) + hidden * hidden
    text = 2 * vocab * hidden + layers * (attention + 3 * hidden * inter + 2 * hidden) + hidden
    block = (2 * v_hidden + v_hidden * 3 * v_hidden + 3 * v_hidden + v_hidden * v_hidden + v_hidden
             + 2 * (v_hidden * v_inter + v_inter) + v_inter * v_hidden + v_hidden)
    merger = v_hidden + (4 * v_hidden) ** 2 + 4 * v_hidden + 4 * v_hidden * hidden + hidden
    return text + 3 * 2 * 14 * 14 * v_hidden + depth * block + merger


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_published_shape_builds_on_meta_and_every_site_resolves(name):
    hidden, inter, layers, heads, kv, vocab, depth, v_hidden, v_inter = PUBLISHED[name]
    config = shape_config(name)
    before, start = rss_bytes(), time.perf_counter()
    model = meta_model(config)
    seconds, grown = time.perf_counter() - start, rss_bytes() - before
    assert all(p.is_meta for p in model.parameters())
    assert seconds < 5 and grown < 256 * 2**20, (seconds, grown)  # about 0.3 s and a few MB measured
    adapter = get_adapter(model)
    language, vision = adapter.sites("language"), adapter.sites("vision")
    assert [s.layer for s in language] == list(range(layers)) and [s.layer for s in vision] == list(range(depth))
    assert {s.d_mlp for s in language} == {inter} and {s.d_mlp for s in vision} == {v_inter}
    for site, width in [(language[-1], hidden), (vision[-1], v_hidden)]:
        assert adapter.down_proj(site).weight.shape == (width, site.d_mlp)
        assert {k: tuple(v.shape) for k, v in adapter.neuron_parameters(site, site.d_mlp - 1).items()
                if k.endswith("weight")} == {"in0.weight": (width,), "in1.weight": (width,), "down.weight": (width,)}
    text = config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (heads, kv, vocab)
    assert sum(text.rope_parameters["mrope_section"]) == hidden // heads // 2
    assert config.vision_config.out_hidden_size == hidden


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_param_count_equals_the_hand_formula(name):
    assert param_count(shape_config(name)) == hand_count(*PUBLISHED[name])
    assert 73.0e9 < hand_count(*PUBLISHED["qwen2_5_vl_72b"]) < 73.5e9  # the published 73.4 B


def test_a_scaled_config_runs_a_forward_with_an_image():
    config = scaled_config("qwen2_5_vl", 256, 512, 2, 2, 64, vision_hidden=160, vision_intermediate=320)
    assert param_count(config) == hand_count(256, 512, 2, 4, 1, 64, 2, 160, 320)
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 256 // 4 // 2
    assert config.vision_config.window_size % (14 * 2) == 0
    model = adapter_class(config.model_type).model_class(config).eval()  # real random weights
    image = config.image_token_id  # the local tokenizer's id: the vocabulary is too small for the published ids
    ids = torch.tensor([[2, 3, image, 4, 10, 11, 12]])
    with torch.no_grad():  # a 28x28 image: 2x2 patches of 14 pixels, merged into one image token
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(4, 1176),
                       image_grid_thw=torch.tensor([[1, 2, 2]]), mm_token_type_ids=(ids == image).long()).logits
    assert logits.shape == (1, 7, 64) and torch.isfinite(logits).all()


def test_unknown_shapes_and_bad_widths_are_named():
    with pytest.raises(InputError, match="qwen2_5_vl_72b"):
        shape_config("llama_70b")
    with pytest.raises(InputError, match="no scaled shapes for model_type 'llava'"):
        scaled_config("llava", 256, 512, 2, 2, 64)
    with pytest.raises(InputError, match="heads"):
        scaled_config("qwen2_5_vl", 250, 512, 2, 2, 64, heads=4)


def test_special_token_ids_come_from_the_tokenizer_or_fit_the_vocabulary():
    cls = adapter_class("qwen2_5_vl")
    tokenizer = train_tokenizer(["a red square", "what is this"], cls.special_tokens, pad_token=cls.pad_token,
                                eos_token=cls.eos_token, image_token=cls.image_token)
    local = scaled_config("qwen2_5_vl", 256, 512, 2, 2, len(tokenizer), tokenizer=tokenizer)
    assert local.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert local.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert shape_config("qwen2_5_vl_7b").image_token_id == 151655  # the published tokenizer's
