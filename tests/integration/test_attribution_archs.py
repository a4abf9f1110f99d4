"""attribute_items on tiny random models of every architecture: shapes of the paths, batching, bad items."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mip_core.adapters import ADAPTERS, get_adapter
from mip_core.attribution import AttributionConfig, attribute_items, layer_scores, path_search
from mip_core.benchmark import Item
from mip_core.hooks import capture
from mip_core.modeling import collate, encode
from mip_core.modeling.inputs import answer_logprob, answer_positions


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


class ImageBench:
    """Stands in for a Benchmark: attribute_items only reads images through ``load_image``."""

    def __init__(self) -> None:
        self.images = {"images/a.png": _image(1), "images/b.png": _image(2)}

    def load_image(self, item: Item) -> Image.Image:
        return self.images[item.image]


def _item(item_id: str, question: str, answer: str, image: str | None = None) -> Item:
    options = (answer, *[o for o in ("Lisbon", "engineer", "1974", "blue") if o != answer][:3])
    return Item(item_id, "p0000", "qa", "birthplace", "multimodal" if image else "text", question, answer,
                options, 0, image)


TEXT = _item("t-born", "Where was Anna Lee born?", "Lisbon")
MULTI = _item("m-name", "What is the name of this person?", "Anna Lee", "images/a.png")


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_every_architecture_gives_well_formed_paths(arch, tiny_models):
    model, processor = tiny_models[arch]
    adapter = get_adapter(model)
    cfg = AttributionConfig(steps=2, top_k=3)
    paths, failures = attribute_items(model, adapter, processor, ImageBench(), [TEXT, MULTI], cfg,
                                      request_ids={"t-born": "r1", "m-name": "r1"})
    assert failures == []
    assert [(p.item_id, p.tower, p.request_id) for p in paths] == [("t-born", "language", "r1"),
                                                                   ("m-name", "vision", "r1")]
    for p in paths:
        layers = [s.layer for s in adapter.sites(p.tower)]
        assert [n.layer for n in p.nodes] == [layer for layer in layers for _ in range(3)]
        for layer in layers:
            nodes = [n for n in p.nodes if n.layer == layer]
            assert [n.rank for n in nodes] == [0, 1, 2]
            assert len({n.neuron for n in nodes}) == 3
            assert [n.score for n in nodes] == sorted((n.score for n in nodes), reverse=True)
        assert all(math.isfinite(n.score) for n in p.nodes) and math.isfinite(p.score)
    assert all(prm.grad is None for prm in model.parameters())


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_batched_items_of_different_lengths_match_one_at_a_time(arch, tiny_models):
    model, processor = tiny_models[arch]
    adapter = get_adapter(model)
    pad = processor.tokenizer.pad_token_id
    cfg = AttributionConfig(steps=2, top_k=3)
    cases = {
        "language": [encode(processor, "Where was Anna Lee born?", None, "Lisbon"),
                     encode(processor, "What does she do?", None, "engineer 1974")],
        "vision": [encode(processor, "What is the name of this person?", _image(1), "Anna Lee"),
                   encode(processor, "How many?", _image(2), "three")],
    }
    for tower, examples in cases.items():
        assert examples[0]["input_ids"].shape != examples[1]["input_ids"].shape
        together = path_search(model, adapter, examples, tower, cfg, pad_token_id=pad)
        for example, batched in zip(examples, together, strict=True):
            alone = path_search(model, adapter, [example], tower, cfg, pad_token_id=pad)[0]
            assert [n.neuron for n in batched] == [n.neuron for n in alone], tower
            scale = max(abs(n.score) for n in alone)
            tol = 1e-5 * max(scale, 1e-3)  # vision (Fisher) scores of a random tiny model are ~1e-7
            assert [n.score for n in batched] == pytest.approx([n.score for n in alone], abs=tol)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_vision_copies_are_copies_of_whole_images(arch, tiny_models):
    """The first vision layer sees, in every interpolation copy, exactly the activations of the image alone.

    Repeating rows of a packed patch sequence (research-code defect 4) would interleave patches instead.
    """
    model, processor = tiny_models[arch]
    adapter = get_adapter(model)
    pad = processor.tokenizer.pad_token_id
    examples = [encode(processor, "What is the name of this person?", _image(1), "Anna Lee"),
                encode(processor, "How many?", _image(2), "three")]
    site = adapter.site("vision", 0)
    with capture(adapter, [site]) as seen:  # registered first: sees the input before the interpolation
        layer_scores(model, adapter, examples, site, steps=3, pad_token_id=pad)
    copies = seen[site].reshape(-1, site.d_mlp)  # [2 examples * 3 copies * rows per image, d_mlp]
    alone = []
    for example in examples:
        batch = collate([example], pad)
        batch.pop("labels")
        with torch.no_grad(), capture(adapter, [site]) as acts:
            model(**batch)
        alone += [acts[site].reshape(-1, site.d_mlp)] * 3
    torch.testing.assert_close(copies, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_bad_items_are_reported_by_id_and_the_rest_completes(tiny_models):
    model, processor = tiny_models["qwen2_5_vl"]
    adapter = get_adapter(model)
    no_answer = Item("t-empty", "p0000", "qa", "hobby", "text", "What does she do?", "", ("", "a", "b", "c"),
                     0, None)
    other = _item("m-count", "How many?", "three", "images/b.png")
    cfg = AttributionConfig(steps=2, top_k=2, batch_items=4)

    items = [TEXT, no_answer, MULTI, other]
    paths, failures = attribute_items(model, adapter, processor, ImageBench(), items, cfg)
    assert [p.item_id for p in paths] == ["t-born", "m-name", "m-count"]
    assert [f.item_id for f in failures] == ["t-empty"]
    assert "t-empty" in failures[0].reason and "answer" in failures[0].reason

    paths, failures = attribute_items(model, adapter, processor, ImageBench(), [TEXT, MULTI, other], cfg,
                                      tower="vision")
    assert [p.item_id for p in paths] == ["m-name", "m-count"] and {p.tower for p in paths} == {"vision"}
    assert [(f.item_id, f.reason) for f in failures] == [
        ("t-born", "item 't-born' has no image; the vision branch needs a multimodal item")]

    paths, failures = attribute_items(model, adapter, processor, ImageBench(), [TEXT, MULTI],
                                      AttributionConfig(steps=2, top_k=2, towers=("language",)))
    assert [p.item_id for p in paths] == ["t-born"]
    assert [f.item_id for f in failures] == ["m-name"] and "towers" in failures[0].reason
    assert all(prm.grad is None for prm in model.parameters())
    assert all(not adapter.down_proj(s)._forward_pre_hooks for s in adapter.sites())


def test_a_failing_batch_does_not_lose_its_good_items(tiny_models, monkeypatch):
    """An error inside the forward of one item's batch is retried item by item."""
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model)
    items = [TEXT, _item("t-job", "What does she do?", "engineer")]
    calls = {"n": 0}
    original = model.forward

    def flaky(*args, **kwargs):  # the first (batched) forward fails, the retries succeed
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    paths, failures = attribute_items(model, adapter, processor, ImageBench(), items,
                                      AttributionConfig(steps=2, top_k=2))
    assert [p.item_id for p in paths] == ["t-born", "t-job"] and failures == []


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_kept_logits_and_fixed_inputs_give_the_plain_forwards_objective(arch, tiny_models):
    """The search asks the LM head only for the positions that predict an answer, with the inputs the model
    derives from the batch (Qwen-VL's 3D positions) computed once: the answer log-probability is a plain
    forward's, on text and on image batches whose items differ in length."""
    model, processor = tiny_models[arch]
    adapter = get_adapter(model)
    images = ImageBench().images
    batches = [[encode(processor, "Where was Anna Lee born?", None, "Lisbon"),
                encode(processor, "What is her job?", None, "engineer 1974")],
               [encode(processor, "What is the name of this person?", images["images/a.png"], "Anna Lee"),
                encode(processor, "Who?", images["images/b.png"], "Bo")]]
    for examples in batches:
        batch = collate(examples, processor.tokenizer.pad_token_id)
        labels = batch.pop("labels")
        kept = answer_positions(labels)
        with torch.no_grad():
            plain = answer_logprob(model(**batch, use_cache=False).logits, labels)
            logits = model(**batch, **adapter.fixed_inputs(batch), use_cache=False, logits_to_keep=kept).logits
        assert logits.shape[1] == kept.numel() < labels.shape[1] - 1
        torch.testing.assert_close(answer_logprob(logits, labels, kept), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_originals_from_the_early_stopped_forward_equal_those_of_the_unscaled_copy(arch, tiny_models,
                                                                                   monkeypatch):
    """Rules without a node at alpha = 1 read the original activations from a forward of the items alone,
    stopped after the tower's last layer. Forcing that path on the right Riemann sum (whose last copy holds the
    same values) must give the same scores on every layer, for padded text and packed image batches."""
    import importlib

    search = importlib.import_module("mip_core.attribution.path_search")
    model, processor = tiny_models[arch]
    adapter = get_adapter(model)
    images = ImageBench().images
    pad = processor.tokenizer.pad_token_id
    cases = {"language": [encode(processor, "Where was Anna Lee born?", None, "Lisbon"),
                          encode(processor, "Job?", None, "engineer 1974")],
             "vision": [encode(processor, "What is the name of this person?", images["images/a.png"], "Anna Lee"),
                        encode(processor, "Who?", images["images/b.png"], "Bo")]}
    cfg = AttributionConfig(steps=3, top_k=2)
    for tower, examples in cases.items():
        from_copy: list[torch.Tensor] = []
        path_search(model, adapter, examples, tower, cfg, pad_token_id=pad, scores_out=from_copy)
        with monkeypatch.context() as patched:
            patched.setattr(search, "reads_originals_from_last_copy", lambda rule: False)
            captured: list[torch.Tensor] = []
            path_search(model, adapter, examples, tower, cfg, pad_token_id=pad, scores_out=captured)
        assert len(captured) == len(adapter.sites(tower)) >= 2
        for got, want in zip(captured, from_copy, strict=True):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
