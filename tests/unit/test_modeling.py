"""Model I/O, tokenizer/processor round trips and input encoding on tiny models of every architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mip_core.adapters import ADAPTERS
from mip_core.errors import InputError, ModelLoadError, UnsupportedModelError
from mip_core.modeling import collate, encode, load_model, prompt_text, save_model
from mip_core.modeling.inputs import IGNORE_INDEX

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_save_load_round_trip(arch, tiny_models, tmp_path):
    model, processor = tiny_models[arch]
    save_model(model, processor, str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(str(tmp_path))
    assert type(loaded.adapter) is ADAPTERS[arch]
    text = "Where was Anna Lee born? three"
    assert loaded.processor.tokenizer(text).input_ids == processor.tokenizer(text).input_ids
    assert loaded.processor.chat_template == processor.chat_template
    assert prompt_text(loaded.processor, "q?", True) == prompt_text(processor, "q?", True)
    batch = collate([encode(processor, "What is the name of this person?", IMAGE),
                     encode(processor, "Where was Anna Lee born?")], processor.tokenizer.pad_token_id)
    batch2 = collate([encode(loaded.processor, "What is the name of this person?", IMAGE),
                      encode(loaded.processor, "Where was Anna Lee born?")], processor.tokenizer.pad_token_id)
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.model(**batch).logits)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_processor_expands_image_placeholder(arch, tiny_models):
    model, processor = tiny_models[arch]
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else None
    image_id = getattr(model.config, "image_token_index", image_id)
    with_image = encode(processor, "What is the name of this person?", IMAGE)
    without = encode(processor, "What is the name of this person?")
    # 32x32 / patch 8 = 16 patches: Qwen merges 2x2 into 4 tokens; LLaVA keeps 16 (CLS dropped)
    assert int((with_image["input_ids"] == image_id).sum()) == {"llava": 16}.get(arch, 4)
    assert int((without["input_ids"] == image_id).sum()) == 0


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_labels_cover_exactly_the_answer_and_end_token(arch, tiny_models):
    _, processor = tiny_models[arch]
    tok = processor.tokenizer
    enc = encode(processor, "Where was Anna Lee born?", None, "Lisbon")
    answer_ids = enc["input_ids"][enc["labels"] != IGNORE_INDEX].tolist()
    assert tok.decode(answer_ids) == "Lisbon" + tok.eos_token
    prompt = encode(processor, "Where was Anna Lee born?")
    n = prompt["input_ids"].shape[0]
    assert torch.equal(enc["input_ids"][:n], prompt["input_ids"])  # the prompt is a prefix of the full text
    assert (enc["labels"][:n] == IGNORE_INDEX).all()


def test_empty_answer_is_rejected_with_the_item_id(tiny_models):
    _, processor = tiny_models["llava"]
    with pytest.raises(InputError, match="item p0001-hobby"):
        encode(processor, "What is her hobby?", None, "  ", item_id="p0001-hobby")


def test_collate_pads_right_and_left(tiny_models):
    _, processor = tiny_models["qwen2_5_vl"]
    pad = processor.tokenizer.pad_token_id
    short, long = encode(processor, "q?"), encode(processor, "a much longer question?")
    right = collate([short, long], pad)
    left = collate([short, long], pad, padding_side="left")
    n = short["input_ids"].shape[0]
    assert torch.equal(right["input_ids"][0, :n], short["input_ids"])
    assert torch.equal(left["input_ids"][0, -n:], short["input_ids"])
    assert right["attention_mask"][0].sum() == left["attention_mask"][0].sum() == n


def test_missing_files_are_listed(tiny_models, tmp_path):
    model, processor = tiny_models["qwen2_vl"]
    save_model(model, processor, str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing: model.safetensors.*tokenizer.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_unknown_architecture_in_a_model_folder(tiny_models, tmp_path):
    model, processor = tiny_models["llava"]
    save_model(model, processor, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'gpt2' has no adapter; supported"):
        load_model(str(tmp_path))


def test_build_tiny_rejects_unknown_arch_and_size():
    from mip_core.modeling import build_tiny

    with pytest.raises(UnsupportedModelError, match="supported"):
        build_tiny("blip2", corpus=["x"])
    with pytest.raises(InputError, match="size 'huge'"):
        build_tiny("llava", size="huge", corpus=["x"])


def test_tokenizer_is_deterministic():
    from mip_core.adapters import adapter_class
    from mip_core.modeling.tokenizer import train_tokenizer

    cls = adapter_class("qwen2_vl")
    corpus = ["the person in the image", "where was she born", "Lisbon", "Porto"] * 3
    kw = dict(pad_token=cls.pad_token, eos_token=cls.eos_token, image_token=cls.image_token)
    a = train_tokenizer(corpus, cls.special_tokens, **kw)
    b = train_tokenizer(list(reversed(corpus)), cls.special_tokens, **kw)
    assert a.get_vocab() == b.get_vocab()
    assert [a.convert_tokens_to_ids(t) for t in cls.special_tokens] == list(range(len(cls.special_tokens)))
    assert a.decode(a("Where was Zoë born?").input_ids) == "Where was Zoë born?"  # byte-level: nothing is unknown
