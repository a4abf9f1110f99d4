"""The research-code reference the attribution bench times against (``benches/research_ref.py``), on the toy.

The bench's speed-up is only as honest as its reference: these check that the reference computes what
docs/method.md section 7 says the script computes, by hand on the toy's weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from toy_models import toy, toy_example

from mip_core.hooks import capture
from mip_core.modeling import collate

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
import research_ref  # noqa: E402

TEXT = toy_example([4, 4, 1, 3, 2, 1, 3], 3)
IMAGE_ITEM = toy_example([1, 5, 2, 4, 3], 2, [[0.5, -1.0, 1.0], [1.0, 0.5, -0.5]])


def _first_row_activations(model, adapter, example, tower, steps=4):
    batch = collate([example] * steps, 0)
    batch.pop("labels")
    sites = adapter.sites(tower)
    with torch.no_grad(), capture(adapter, sites) as store:
        model(**batch)
    return [store[s].reshape(-1, s.d_mlp)[0] for s in sites]


def test_vision_scores_reduce_to_the_first_patch_rows_activation():
    """Squared z-scores over the m copies sum to m - 1 for every neuron whose gradient varies, so the vision path
    is the top-k of the first patch row's activation (times m - 1): the degenerate selection the docs describe."""
    model, adapter = toy()
    steps = 4
    nodes = research_ref.research_path(model, adapter, IMAGE_ITEM, "vision", steps, 3, 0)
    for layer_nodes, activation in zip(nodes, _first_row_activations(model, adapter, IMAGE_ITEM, "vision", steps),
                                       strict=True):
        scored = [n for n in layer_nodes if n.score != 0]
        assert scored
        for node in scored:
            assert node.score == pytest.approx((steps - 1) * float(activation[node.neuron]), rel=1e-4)


def test_left_riemann_completeness_at_layer_zero_and_parameter_gradients_restored():
    """At layer 0 the reference's sum is the left Riemann sum of ``a * dL/da`` at position 0: with many nodes it
    converges to the loss change, with few it does not; parameters end frozen as they started."""
    model, adapter = toy()
    path = research_ref.research_path(model, adapter, TEXT, "language", 4, 2, 0)
    assert [len(layer) for layer in path] == [2, 2]
    few = research_ref.completeness(model, adapter, TEXT, "language", 4, path, 0)[0]
    many = research_ref.completeness(model, adapter, TEXT, "language", 256, path, 0)[0]
    assert few[1] == pytest.approx(many[1], rel=1e-3) and many[1] != 0  # one loss change, whatever the nodes
    assert abs(many[0] - many[1]) < abs(few[0] - few[1])
    assert abs(many[0] - many[1]) < 0.05 * abs(many[1])
    assert not any(p.requires_grad for p in model.parameters())
