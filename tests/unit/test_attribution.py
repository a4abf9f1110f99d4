"""Path search on the hand-weighted toy: hand computation, Captum, completeness, batching, Fisher, hygiene.

The reference implementation below (``ref_*``) re-derives the toy's forward from its weights with explicit
loops in float64 and takes gradients by central finite differences, so it shares no code with the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import LayerIntegratedGradients
from toy_models import IMAGE, toy, toy_example

from mip_core.adapters import get_adapter
from mip_core.attribution import (
    RULES,
    AttributionConfig,
    EncodedItem,
    answer_logprob,
    attribute_examples,
    completeness,
    layer_scores,
    nodes_and_weights,
    path_search,
)
from mip_core.errors import InputError
from mip_core.hooks import patch
from mip_core.modeling import collate, encode
from mip_core.types import PathNode

IMG_A = [[0.5, -1.0, 1.0], [1.0, 0.5, -0.5]]
IMG_B = [[2.0, -1.0, 0.0], [1.5, 0.0, -1.0]]
TEXT = [toy_example([1, 2, 3, 4, 2], 2), toy_example([3, 1, 2], 1), toy_example([4, 4, 1, 3, 2, 1, 3], 3)]
MULTI = [toy_example([1, IMAGE, 2, 4, 3], 2, IMG_A), toy_example([IMAGE, 3, 1], 1, IMG_B)]


# ---------------------------------------------------------------------------------------------- reference
def _w(model):
    """The toy's weights as float64 nested tensors."""
    def d(t):
        return t.detach().double()

    return dict(
        embed=d(model.embed.weight), projector=d(model.projector.weight), head=d(model.head.weight),
        vision=[(d(b.mlp.fc1.weight), d(b.mlp.fc1.bias), d(b.mlp.fc2.weight), d(b.mlp.fc2.bias))
                for b in model.vision],
        language=[(d(b.mlp.gate_proj.weight), d(b.mlp.up_proj.weight), d(b.mlp.down_proj.weight))
                  for b in model.language],
    )


def ref_forward(w, example, override=None):
    """F = sum of log p(answer token) ; ``override[(tower, layer)](a) -> a`` replaces activations.

    Also returns the activations each layer computed (before any override), keyed by ``(tower, layer)``.
    """
    override = override or {}
    ids = example["input_ids"].tolist()
    labels = example["labels"].tolist()
    seen = {}
    h = [w["embed"][t].clone() for t in ids]
    if "pixel_values" in example:
        v = example["pixel_values"][0].double()  # [P, 3]
        for layer, (fc1, b1, fc2, b2) in enumerate(w["vision"]):
            a = torch.stack([torch.relu(fc1 @ v[p] + b1) for p in range(v.shape[0])])  # [P, d_mlp]
            seen[("vision", layer)] = a
            a = override.get(("vision", layer), lambda x: x)(a)
            v = torch.stack([v[p] + fc2 @ a[p] + b2 for p in range(v.shape[0])])
        h[ids.index(IMAGE)] = w["projector"] @ (sum(v[p] for p in range(v.shape[0])) / v.shape[0])
    for layer, (gate, up, down) in enumerate(w["language"]):
        c = [sum(h[: t + 1]) / (t + 1) for t in range(len(h))]
        a = torch.stack([torch.nn.functional.silu(gate @ c[t]) * (up @ c[t]) for t in range(len(h))])
        seen[("language", layer)] = a
        a = override.get(("language", layer), lambda x: x)(a)
        h = [c[t] + down @ a[t] for t in range(len(h))]
    f = 0.0
    for t in range(1, len(ids)):
        if labels[t] != -100:
            logits = w["head"] @ h[t - 1]
            f = f + logits[labels[t]] - torch.logsumexp(logits, 0)
    return float(f), seen


#: The two-node Gauss-Legendre rule on [0, 1], by hand: nodes 1/2 -+ 1/(2 sqrt 3), weights 1/2.
GAUSS_2 = [(0.5 - 0.5 / math.sqrt(3), 0.5), (0.5 + 0.5 / math.sqrt(3), 0.5)]


def ref_layer_scores(model, example, tower, layer, path, steps, fisher, nodes=None):
    """IG/IFI of every neuron of one layer by explicit loops; ``path = {earlier layer: [neurons]}``.

    ``nodes``: ``[(alpha, weight)]``; by default the right Riemann sum ``(s/steps, 1/steps)``.
    """
    w = _w(model)
    _, original = ref_forward(w, example)
    a = original[(tower, layer)]  # [n_positions, d_mlp]
    scores = [0.0] * a.shape[1]
    eps = 1e-5
    for alpha, weight in nodes or [(s / steps, 1 / steps) for s in range(1, steps + 1)]:

        def scaled_earlier(x, earlier, alpha=alpha):
            x = x.clone()
            for j in path.get(earlier, ()):
                x[:, j] = alpha * original[(tower, earlier)][:, j]
            return x

        for p in range(a.shape[0]):
            for j in range(a.shape[1]):
                def at(delta, p=p, j=j, alpha=alpha):
                    def target(x):
                        y = alpha * a.clone()
                        y[p, j] += delta
                        return y

                    over = {(tower, e): (lambda x, e=e: scaled_earlier(x, e)) for e in path}
                    over[(tower, layer)] = target
                    return ref_forward(w, example, over)[0]

                g = (at(eps) - at(-eps)) / (2 * eps)
                scores[j] += float(a[p, j]) * (g * g if fisher else g) * weight
    return scores


def ref_path(model, example, tower, steps, k, quadrature=None):
    """The greedy search by hand: top-k per layer (ties: lower id first), each given the earlier path."""
    path, nodes = {}, []
    for layer in range(2):
        scores = ref_layer_scores(model, example, tower, layer, path, steps, fisher=tower == "vision",
                                  nodes=quadrature)
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]
        path[layer] = order
        nodes += [(layer, rank, j, scores[j]) for rank, j in enumerate(order)]
    return nodes


def _as_tuples(nodes):
    return [(n.layer, n.rank, n.neuron, n.score) for n in nodes]


def _assert_same_path(found, expected, tol=1e-5):
    assert [node[:3] for node in _as_tuples(found)] == [node[:3] for node in expected]
    for (_, _, _, got), (_, _, _, want) in zip(_as_tuples(found), expected, strict=True):
        assert got == pytest.approx(want, abs=tol, rel=1e-4)


# ---------------------------------------------------------------------------------------------- config
def test_config_validates_every_field():
    assert AttributionConfig() == AttributionConfig(4, 5, 4, ("language", "vision"))
    for field, bad in [("steps", 0), ("top_k", -1), ("batch_items", 1.5), ("steps", True),
                       ("towers", ()), ("towers", ("text",)), ("towers", ("vision", "vision")),
                       ("rule", "simpson")]:
        with pytest.raises(ValueError, match=f"AttributionConfig.{field}"):
            AttributionConfig(**{field: bad})
    with pytest.raises(ValueError, match="AttributionConfig.steps=1 with rule='log_trapezoid'"):
        AttributionConfig(steps=1, rule="log_trapezoid")


def test_quadrature_rules_integrate_what_they_promise():
    """Nodes and weights by hand, and the polynomials each rule integrates exactly on [0, 1]."""
    def integral(rule, steps, f):
        alphas, weights = nodes_and_weights(rule, steps)
        return sum(w * f(a) for a, w in zip(alphas, weights, strict=True))

    assert nodes_and_weights("right", 4) == ((0.25, 0.5, 0.75, 1.0), (0.25,) * 4)
    alphas, weights = nodes_and_weights("gauss_legendre", 2)
    assert [*alphas, *weights] == pytest.approx([a for a, _ in GAUSS_2] + [w for _, w in GAUSS_2])
    assert integral("gauss_legendre", 2, lambda x: x ** 3) == pytest.approx(1 / 4, abs=1e-12)  # degree 2m - 1
    assert integral("gauss_legendre", 4, lambda x: x ** 7) == pytest.approx(1 / 8, abs=1e-12)
    assert integral("right", 4, lambda x: x) == pytest.approx(0.625)  # exact for constants only
    alphas, weights = nodes_and_weights("log_trapezoid", 5)
    assert (alphas[0], alphas[1], alphas[-1]) == (0.0, pytest.approx(1e-6), 1.0)
    assert all(b / a == pytest.approx(alphas[2] / alphas[1]) for a, b in zip(alphas[1:], alphas[2:]))
    assert integral("log_trapezoid", 5, lambda x: 3 * x + 1) == pytest.approx(2.5, abs=1e-12)  # linear: exact
    for rule in RULES:
        assert sum(nodes_and_weights(rule, 6)[1]) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- exact values
@pytest.mark.parametrize("index", [0, 2])
def test_language_path_equals_hand_computation(index):
    model, adapter = toy()
    example = TEXT[index]
    found = path_search(model, adapter, [example], "language", AttributionConfig(steps=3, top_k=2))[0]
    _assert_same_path(found, ref_path(model, example, "language", steps=3, k=2))


@pytest.mark.parametrize(("tower", "example"), [("language", TEXT[2]), ("vision", MULTI[0])])
def test_gauss_legendre_path_equals_hand_computation(tower, example):
    """No copy sits at alpha = 1: the original activations come from a separate forward, also for the earlier
    path at layer 1; the hand reference reads them from its own unscaled forward."""
    model, adapter = toy()
    cfg = AttributionConfig(steps=2, top_k=2, rule="gauss_legendre")
    found = path_search(model, adapter, [example], tower, cfg)[0]
    _assert_same_path(found, ref_path(model, example, tower, steps=2, k=2, quadrature=GAUSS_2), tol=1e-6)


def test_vision_path_equals_hand_computation_with_squared_gradients():
    model, adapter = toy()
    example = MULTI[0]
    found = path_search(model, adapter, [example], "vision", AttributionConfig(steps=3, top_k=2))[0]
    _assert_same_path(found, ref_path(model, example, "vision", steps=3, k=2), tol=1e-6)


def test_layer_scores_scale_earlier_path_neurons_jointly():
    """The earlier path changes the scores, and exactly as the joint interpolation says."""
    model, adapter = toy()
    example = TEXT[2]
    site = adapter.site("language", 1)
    alone = layer_scores(model, adapter, [example], site, steps=4)[0]
    joint = layer_scores(model, adapter, [example], site, steps=4, path=[{0: [0, 2]}])[0]
    expected = ref_layer_scores(model, example, "language", 1, {0: [0, 2]}, 4, fisher=False)
    assert joint.tolist() == pytest.approx(expected, abs=1e-5)
    assert not torch.allclose(alone, joint, atol=1e-4)
    expected_alone = ref_layer_scores(model, example, "language", 1, {}, 4, fisher=False)
    assert alone.tolist() == pytest.approx(expected_alone, abs=1e-5)


def test_ties_go_to_the_lower_neuron_id():
    model, adapter = toy()
    with torch.no_grad():  # vision layer 0 writes nothing: every neuron scores 0
        model.vision[0].mlp.fc2.weight.zero_()
    nodes = path_search(model, adapter, [MULTI[0]], "vision", AttributionConfig(steps=2, top_k=2))[0]
    assert [(n.layer, n.neuron, n.score) for n in nodes[:2]] == [(0, 0, 0.0), (0, 1, 0.0)]


# ---------------------------------------------------------------------------------------------- Captum
def captum_layer_ig(model, down, examples, steps, pad_token_id=0, method="riemann_right"):
    """Captum's LayerIntegratedGradients at ``down``'s input, summed over real positions: [B, d_mlp].

    The layer baseline must be zero whatever the model makes of a zero input, so a pre-hook registered before
    Captum's multiplies the layer input by a per-row gain: 1 for the inputs, 0 for the baselines (Captum then
    overrides the layer input with its own interpolation during the integration).
    """
    batch = collate(examples, pad_token_id)
    labels = batch.pop("labels")
    names = sorted(batch)
    gain = {}
    handle = down.register_forward_pre_hook(
        lambda m, args: (args[0] * gain["g"].view(-1, *[1] * (args[0].dim() - 1)),))
    try:
        def forward(g, labels, *values):
            gain["g"] = g
            return answer_logprob(model(**dict(zip(names, values, strict=True))).logits, labels)

        ones = torch.ones(len(examples), 1)
        attr = LayerIntegratedGradients(forward, down, multiply_by_inputs=True).attribute(
            ones, baselines=torch.zeros_like(ones), n_steps=steps, method=method,
            additional_forward_args=(labels, *(batch[k] for k in names)), attribute_to_layer_input=True)
    finally:
        handle.remove()
    return (attr * batch["attention_mask"].unsqueeze(-1)).sum(1).float()  # sum over real positions


def test_first_layer_equals_captum_layer_integrated_gradients():
    """Single-layer IG at the down projection's input, zero baseline, right Riemann sum (toy model)."""
    model, adapter = toy()
    site = adapter.site("language", 0)
    expected = captum_layer_ig(model, adapter.down_proj(site), TEXT[:2], steps=4)
    got = layer_scores(model, adapter, TEXT[:2], site, steps=4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_first_layer_gauss_legendre_equals_captum():
    """Captum's own Gauss-Legendre integration, against the library's rule on the same layer."""
    model, adapter = toy()
    site = adapter.site("language", 0)
    expected = captum_layer_ig(model, adapter.down_proj(site), TEXT[:2], steps=3, method="gausslegendre")
    got = layer_scores(model, adapter, TEXT[:2], site, steps=3, rule="gauss_legendre")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_first_layer_equals_captum_on_a_tiny_hf_model(tiny_models):
    """The same on a tiny Qwen2.5-VL (attention, RoPE, biases), two text items of different lengths."""
    model, processor = tiny_models["qwen2_5_vl"]
    adapter = get_adapter(model)
    examples = [encode(processor, "Where was Anna Lee born?", None, "Lisbon"),
                encode(processor, "What does she do?", None, "engineer 1974")]
    pad = processor.tokenizer.pad_token_id
    site = adapter.site("language", 0)
    expected = captum_layer_ig(model, adapter.down_proj(site), examples, steps=3, pad_token_id=pad)
    got = layer_scores(model, adapter, examples, site, steps=3, pad_token_id=pad)
    assert got.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- completeness
def test_completeness_gap_shrinks_with_steps():
    """sum_j IG(j) -> F(x) - F(layer zeroed) for the first layer as m grows (right Riemann sum)."""
    model, adapter = toy()
    example = TEXT[2]
    site = adapter.site("language", 0)
    batch = collate([example], 0)
    labels = batch.pop("labels")
    with torch.no_grad():
        f_x = answer_logprob(model(**batch).logits, labels).item()
        with patch(adapter, {site: lambda s, x: torch.zeros_like(x)}):
            f_zero = answer_logprob(model(**batch).logits, labels).item()
    gaps = []
    for steps in (1, 4, 16, 64):
        total = layer_scores(model, adapter, [example], site, steps=steps).sum().item()
        gaps.append(abs(total - (f_x - f_zero)))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < gaps[0] / 20, gaps
    assert gaps[-1] < 1e-3, gaps


def test_completeness_counts_the_earlier_path_and_matches_the_hand_computed_change():
    """At layer 1 with path neurons at layer 0, the integral runs over both: ``completeness`` adds their terms,
    and its ``F(a) - F(0)`` is the float64 reference's with those neurons and layer 1 zeroed."""
    model, adapter = toy()
    example, path = TEXT[2], {0: [0, 2]}
    site = adapter.site("language", 1)
    total, delta = completeness(model, adapter, [example], site, steps=4, rule="gauss_legendre", path=[path])

    def zero_path(x):
        x = x.clone()
        x[:, path[0]] = 0.0
        return x

    w = _w(model)
    zeroed = {("language", 0): zero_path, ("language", 1): lambda x: torch.zeros_like(x)}
    assert float(delta[0]) == pytest.approx(ref_forward(w, example)[0] - ref_forward(w, example, zeroed)[0],
                                            abs=1e-5)
    assert abs(float(total[0] - delta[0])) < 1e-3 * abs(float(delta[0]))  # complete: the toy is smooth
    layer_only = layer_scores(model, adapter, [example], site, steps=4, path=[path], rule="gauss_legendre",
                              method="ig").sum()
    assert abs(float(layer_only - delta[0])) > 0.1 * abs(float(delta[0]))  # without the path's terms: not


def test_gauss_legendre_converges_faster_than_the_right_sum_on_a_smooth_integrand():
    """The language toy (SiLU) is smooth along the path: two Gauss-Legendre nodes beat 64 right-sum nodes."""
    model, adapter = toy()
    site = adapter.site("language", 0)

    def gap(rule, steps):
        total, delta = completeness(model, adapter, [TEXT[2]], site, steps=steps, rule=rule)
        return abs(float(total[0] - delta[0]))

    assert gap("gauss_legendre", 2) < gap("right", 64) / 100


# ---------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize(("tower", "examples"), [("language", TEXT), ("vision", MULTI)])
def test_batching_gives_the_same_paths_as_one_at_a_time(tower, examples):
    model, adapter = toy()
    cfg = AttributionConfig(steps=4, top_k=2)
    together = path_search(model, adapter, examples, tower, cfg)
    for example, batched in zip(examples, together, strict=True):
        alone = path_search(model, adapter, [example], tower, cfg)[0]
        assert [(n.layer, n.rank, n.neuron) for n in batched] == [(n.layer, n.rank, n.neuron) for n in alone]
        assert [n.score for n in batched] == pytest.approx([n.score for n in alone], abs=1e-5)
    assert len({tuple(n.neuron for n in p) for p in together}) > 1  # the examples really differ


# ---------------------------------------------------------------------------------------------- Fisher
def test_vision_ranks_by_squared_gradients():
    """Constant activations a = (1, 1, 3) whose gradients are proportional to (-2, 1.5, 0.1) by construction.

    Ranking by activation picks neuron 2, by gradient x activation neuron 1, by a * g^2 (IFI) neuron 0.
    """
    model, adapter = toy()
    last = model.vision[1].mlp
    with torch.no_grad():
        last.fc1.weight.zero_()
        last.fc1.bias.copy_(torch.tensor([1.0, 1.0, 3.0]))  # relu(bias): the same activation at every patch
        u = torch.tensor([-1.0, 0.0, 0.0])  # the direction along which F increases here
        last.fc2.weight.copy_(torch.outer(u, torch.tensor([-2.0, 1.5, 0.1])))  # neuron j writes w_j * u
    example = MULTI[0]
    nodes = path_search(model, adapter, [example], "vision", AttributionConfig(steps=2, top_k=1))[0]
    earlier = {0: [nodes[0].neuron]}  # the layer-0 pick is scaled jointly with layer 1
    ig = ref_layer_scores(model, example, "vision", 1, earlier, 2, fisher=False)
    ifi = ref_layer_scores(model, example, "vision", 1, earlier, 2, fisher=True)
    activation = [1.0, 1.0, 3.0]
    best = {name: max(range(3), key=lambda j, s=s: s[j]) for name, s in
            [("activation", activation), ("ig", ig), ("ifi", ifi)]}
    assert best == {"activation": 2, "ig": 1, "ifi": 0}, (ig, ifi)  # the construction really separates them
    layer1 = [n for n in nodes if n.layer == 1]
    assert [n.neuron for n in layer1] == [0]
    assert layer1[0].score == pytest.approx(ifi[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------- hygiene
def test_no_parameter_gradients_and_flags_restored():
    model, adapter = toy()
    model.train()
    model.head.weight.requires_grad_(False)  # a mixed set of flags must come back exactly
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for tower, examples in [("language", TEXT), ("vision", MULTI)]:
        path_search(model, adapter, examples, tower, AttributionConfig(steps=2, top_k=1))
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert model.training
    assert all(not adapter.down_proj(s)._forward_pre_hooks for s in adapter.sites())


def test_path_search_works_under_no_grad_and_rejects_bad_top_k():
    model, adapter = toy()
    with torch.no_grad():
        nodes = path_search(model, adapter, TEXT[:1], "language", AttributionConfig(steps=2, top_k=3))[0]
    assert len(nodes) == 6 and all(math.isfinite(n.score) for n in nodes)
    with pytest.raises(ValueError, match="top_k=4 exceeds"):
        path_search(model, adapter, TEXT[:1], "language", AttributionConfig(top_k=4))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_items_fail_alone_and_the_rest_completes():
    model, adapter = toy()
    no_answer = toy_example([1, 2, 3], 0)
    items = [
        EncodedItem("t0", "language", TEXT[0]),
        EncodedItem("no-answer", "language", no_answer),
        EncodedItem("m0", "vision", MULTI[0]),
        EncodedItem("text-on-vision", "vision", TEXT[1]),
        EncodedItem("t1", "language", TEXT[1]),
        EncodedItem("m1", "vision", MULTI[1]),
    ]
    cfg = AttributionConfig(steps=2, top_k=2, batch_items=4)
    paths, failures = attribute_examples(model, adapter, items, cfg, pad_token_id=0,
                                         request_ids={"t0": "req-7"})
    assert [p.item_id for p in paths] == ["t0", "m0", "t1", "m1"]
    assert [(p.tower, p.request_id) for p in paths[:2]] == [("language", "req-7"), ("vision", None)]
    assert [f.item_id for f in failures] == ["no-answer", "text-on-vision"]
    assert "no-answer" in failures[0].reason and "no answer span" in failures[0].reason
    assert "has no image; the vision branch needs a multimodal item" in failures[1].reason
    # the same paths as when the good items run without the bad ones
    alone = path_search(model, adapter, [TEXT[0], TEXT[1]], "language", cfg)
    assert [n.neuron for n in paths[0].nodes] == [n.neuron for n in alone[0]]
    assert all(isinstance(n, PathNode) for p in paths for n in p.nodes)


def test_a_batch_that_raises_is_retried_item_by_item(monkeypatch):
    """An error only detectable inside the forward (here a non-finite score) fails its item, not the batch."""
    model, adapter = toy()
    poisoned = toy_example([1, 2, 3], 1)
    poisoned["input_ids"] = poisoned["input_ids"].clone()
    poisoned["input_ids"][0] = 4
    with torch.no_grad():
        model.embed.weight[4] = float("nan")  # token 4 only occurs in the poisoned example
    items = [EncodedItem("ok", "language", toy_example([1, 2, 3], 1)),
             EncodedItem("bad", "language", poisoned)]
    paths, failures = attribute_examples(model, adapter, items, AttributionConfig(steps=2, top_k=1),
                                         pad_token_id=0)
    assert [p.item_id for p in paths] == ["ok"]
    assert [f.item_id for f in failures] == ["bad"] and "non-finite" in failures[0].reason


def test_path_search_raises_on_invalid_examples():
    model, adapter = toy()
    with pytest.raises(InputError, match="no answer span"):
        path_search(model, adapter, [toy_example([1, 2], 0)], "language", AttributionConfig(top_k=1))
    with pytest.raises(InputError, match="has no image"):
        path_search(model, adapter, [TEXT[0]], "vision", AttributionConfig(top_k=1))
