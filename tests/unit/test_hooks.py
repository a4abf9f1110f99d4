"""capture() / patch(): shapes, identity patches, and hook removal even when the forward raises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from toy_models import IMAGE, toy, toy_example

from mip_core.adapters import ADAPTERS, get_adapter
from mip_core.hooks import capture, patch
from mip_core.modeling import collate, encode

IMG = [[0.5, -1.0, 1.0], [1.0, 0.5, -0.5]]


def _toy_batch():
    return collate([toy_example([1, IMAGE, 2, 3], 1, IMG), toy_example([2, IMAGE, 4], 1, IMG)], 0)


def _no_hooks(adapter) -> bool:
    return all(not adapter.down_proj(s)._forward_pre_hooks for s in adapter.sites())


def test_capture_records_every_site_with_its_layout():
    model, adapter = toy()
    batch = _toy_batch()
    with torch.no_grad(), capture(adapter, adapter.sites()) as acts:
        model(**batch)
    assert set(acts) == set(adapter.sites())
    for site in adapter.sites("language"):
        assert acts[site].shape == (2, 4, site.d_mlp)  # [batch, seq, d_mlp]
    for site in adapter.sites("vision"):
        assert acts[site].shape == (2, 2, site.d_mlp)  # [n_images, patches, d_mlp]
    assert _no_hooks(adapter)


def test_capture_without_detach_keeps_the_graph():
    model, adapter = toy()
    site = adapter.sites("language")[0]
    with capture(adapter, [site], detach=False) as acts:
        out = model(**_toy_batch()).logits.sum()
    (grad,) = torch.autograd.grad(out, acts[site])
    assert grad.shape == acts[site].shape and bool(grad.abs().sum() > 0)


def test_identity_patch_leaves_logits_unchanged_and_a_zero_patch_changes_them():
    model, adapter = toy()
    batch = _toy_batch()
    with torch.no_grad():
        ref = model(**batch).logits
        with patch(adapter, {s: (lambda site, x: x) for s in adapter.sites()}):
            same = model(**batch).logits
        with patch(adapter, {adapter.sites("language")[1]: lambda site, x: torch.zeros_like(x)}):
            zeroed = model(**batch).logits
    assert torch.equal(ref, same)
    assert not torch.allclose(ref, zeroed)
    assert _no_hooks(adapter)


def test_patch_receives_its_site_and_rejects_a_wrong_shape():
    model, adapter = toy()
    seen = []
    record = {s: (lambda site, x: seen.append(site) or x) for s in adapter.sites()}
    with torch.no_grad(), patch(adapter, record):
        model(**_toy_batch())
    assert sorted(seen) == adapter.sites()
    with pytest.raises(ValueError, match="replacement has shape"):
        with torch.no_grad(), patch(adapter, {adapter.sites("language")[0]: lambda site, x: x[..., :1]}):
            model(**_toy_batch())
    assert _no_hooks(adapter)


def test_no_hook_remains_after_a_forward_that_raises():
    model, adapter = toy()

    def boom(site, x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with capture(adapter, adapter.sites()), patch(adapter, {adapter.sites("language")[1]: boom}):
            model(**_toy_batch())
    assert _no_hooks(adapter)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(adapter, adapter.sites()):
            raise RuntimeError("boom")
    assert _no_hooks(adapter)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_capture_shapes_on_tiny_models(arch, tiny_models):
    model, processor = tiny_models[arch]
    adapter = get_adapter(model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    examples = [encode(processor, "What is the name of this person?", image, "Anna Lee"),
                encode(processor, "Where was Anna Lee born?", image, "Lisbon")]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad(), capture(adapter, adapter.sites()) as acts:
        model(**batch)
    for site in adapter.sites():
        assert acts[site].shape[-1] == site.d_mlp
        per_example = adapter.rows_per_example(site.tower, acts[site], batch)
        assert len(per_example) == 2
        if site.tower == "language":
            assert [len(r) for r in per_example] == batch["attention_mask"].sum(1).tolist()
        else:
            assert len(per_example[0]) == len(per_example[1]) > 0  # same image size -> same patch count
    assert _no_hooks(adapter)
