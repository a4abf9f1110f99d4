"""Adapters on tiny configs of every architecture: sites, shapes, neuron parameter slices, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mip_core.adapters import ADAPTERS, TINY_SIZES, adapter_class, get_adapter
from mip_core.errors import UnsupportedModelError
from mip_core.modeling import collate, encode

SIZE = TINY_SIZES["test"]


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_site_counts_match_config(arch, tiny_models):
    model, _ = tiny_models[arch]
    adapter = get_adapter(model)
    assert type(adapter) is ADAPTERS[arch]
    assert [s.layer for s in adapter.sites("language")] == list(range(SIZE.layers))
    assert [s.layer for s in adapter.sites("vision")] == list(range(SIZE.vision_depth))
    assert {s.d_mlp for s in adapter.sites("language")} == {SIZE.mlp}
    assert {s.d_mlp for s in adapter.sites("vision")} == {SIZE.vision_mlp}


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_neuron_parameters_are_views_of_the_right_slices(arch, tiny_models):
    model, _ = tiny_models[arch]
    adapter = get_adapter(model)
    for site in adapter.sites():
        j = site.d_mlp - 3
        slices = adapter.neuron_parameters(site, j)
        down = adapter.down_proj(site)
        assert down.in_features == site.d_mlp
        assert torch.equal(slices["down.weight"], down.weight[:, j])
        assert slices["down.weight"].data_ptr() == down.weight[:, j].data_ptr()  # a view, not a copy
        for k, lin in enumerate(adapter.neuron_inputs(site)):
            assert lin.out_features == site.d_mlp
            assert torch.equal(slices[f"in{k}.weight"], lin.weight[j])
            assert (f"in{k}.bias" in slices) == (lin.bias is not None)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_zeroing_a_neurons_down_column_equals_zeroing_its_activation(arch, tiny_models):
    """The adapter's 'neuron j' really is the input coordinate j of the down projection."""
    model, _ = tiny_models[arch]
    adapter = get_adapter(model)
    site = adapter.sites("language")[-1]
    down = adapter.down_proj(site)
    x = torch.randn(3, site.d_mlp)
    j = 5
    x_zeroed = x.clone()
    x_zeroed[:, j] = 0
    w = down.weight.detach().clone()
    w[:, j] = 0
    expected = nn.functional.linear(x, w, down.bias)
    assert torch.allclose(down(x_zeroed), expected, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_rows_per_example_split_captured_activations(arch, tiny_models):
    model, processor = tiny_models[arch]
    adapter = get_adapter(model)
    examples = [
        encode(processor, "Where was Anna Lee born?", None, "Lisbon"),
        encode(processor, "What is the name of this person?", _image(1), "Anna Lee"),
        encode(processor, "What is the name of this person?", _image(2), "Anna Lee"),
    ]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    captured = {}
    sites = [adapter.sites("vision")[0], adapter.sites("language")[0]]
    handles = [adapter.down_proj(s).register_forward_pre_hook(
        lambda m, a, s=s: captured.__setitem__(s, a[0].detach())) for s in sites]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    vision_rows = adapter.rows_per_example("vision", captured[sites[0]], batch)
    language_rows = adapter.rows_per_example("language", captured[sites[1]], batch)
    assert [r.shape[0] for r in language_rows] == [int(e["attention_mask"].sum()) for e in examples]
    assert vision_rows[0].shape == (0, SIZE.vision_mlp)  # the text-only example has no image rows
    assert vision_rows[1].shape == vision_rows[2].shape
    assert vision_rows[1].shape[0] >= (SIZE.image_size // SIZE.patch) ** 2  # every patch (+ CLS for CLIP)
    assert not torch.equal(vision_rows[1], vision_rows[2])  # different images, different activations


def test_llava_with_siglip_tower_and_qwen2_language_model():
    """LLaVA's adapter sub-dispatches on the nested configs: SigLIP + Qwen2 resolves like CLIP + Llama."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        text_config=Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1).to_dict(),
        image_token_index=3, vision_feature_layer=-1,
    )
    adapter = get_adapter(LlavaForConditionalGeneration(config))
    assert [(s.layer, s.d_mlp) for s in adapter.sites("vision")] == [(0, 48), (1, 48), (2, 48)]
    assert [(s.layer, s.d_mlp) for s in adapter.sites("language")] == [(0, 80), (1, 80)]


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match="supported: llava, qwen2_5_vl, qwen2_vl"):
        adapter_class("gpt2")

    class NotAVLM(nn.Module):
        config = type("C", (), {"model_type": "bert"})()

    with pytest.raises(UnsupportedModelError, match="'bert'"):
        get_adapter(NotAVLM())


def test_module_mismatch_fails_loudly(tiny_models):
    """A config that declares more layers than the model has must not resolve silently."""
    model, _ = tiny_models["qwen2_5_vl"]
    adapter_cls = ADAPTERS["qwen2_5_vl"]

    class Wrong(adapter_cls):
        def n_layers(self, tower):
            return super().n_layers(tower) + 1

    with pytest.raises(UnsupportedModelError, match="could not find the 3 vision MLPs"):
        Wrong(model)
