"""The selection and edit variations of the selectivity study, on hand-weighted toy models.

- the contrastive rule, on a toy model wired so that one neuron serves only the forget items and another (stronger)
  one serves forget and retain items alike: the contrastive rule must pick the forget-only neuron, where the
  paper's union of per-item top-k picks the shared one;
- per-request paths (one edit per request on its own neurons) and per-request targets (one direction per request);
- the paper-faithful variant kept under its own name.
"""

from __future__ import annotations

import pytest
import torch
from toy_models import IMAGE, toy, toy_example

from mip_core.attribution import AttributionConfig
from mip_core.attribution.path_search import path_search
from mip_core.editing.base import UnlearnData
from mip_core.editing.methods import EditConfig, MipEditor, MipPaper, RandomControl, get_method
from mip_core.editing.rmisu import RMisUConfig, _direction_index
from mip_core.editing.selection import contrastive_selection, dense_scores
from mip_core.errors import InputError
from mip_core.path_graph import GraphNode, PathGraph

MARKER, COMMON, ANSWER, OTHER = 1, 2, 3, 4  # token ids of the specialised toy model


def specialised_toy():
    """The toy VLM rewired: language layer 0 has a forget-only neuron (1), a shared neuron (0) and a dead one (2).

    Embeddings are one-hot: dim 0 = MARKER (only forget items contain it), dim 1 = COMMON (every item), dim 2 =
    ANSWER, dim 3 = OTHER. Neuron 0 reads COMMON, neuron 1 reads MARKER; both write into dim 2, which the head reads
    as the ANSWER logit, so both raise log p(answer). Neuron 0 is the stronger (larger weights), so on a forget item
    it is the top-1 neuron; on a retain item only neuron 0 fires. Layer 1 is switched off.
    """
    model, adapter = toy()
    with torch.no_grad():
        model.embed.weight.zero_()
        for token, dim in ((MARKER, 0), (COMMON, 1), (ANSWER, 2), (OTHER, 3)):
            model.embed.weight[token, dim] = 1.0
        mlp = model.language[0].mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.zero_()
            lin.weight[0, 1] = 2.0  # neuron 0 <- COMMON
            lin.weight[1, 0] = 1.5  # neuron 1 <- MARKER
        mlp.down_proj.weight.zero_()
        mlp.down_proj.weight[2, 0] = 1.0
        mlp.down_proj.weight[2, 1] = 0.6
        for p in model.language[1].mlp.parameters():
            p.zero_()
        model.head.weight.zero_()
        model.head.weight[ANSWER, 2] = 1.0
    return model, adapter


FORGET = [toy_example([COMMON, MARKER, ANSWER], 1), toy_example([COMMON, MARKER, COMMON, ANSWER], 1),
          toy_example([COMMON, COMMON, MARKER, ANSWER], 1)]
RETAIN = [toy_example([COMMON, OTHER, ANSWER], 1), toy_example([COMMON, OTHER, COMMON, ANSWER], 1),
          toy_example([COMMON, COMMON, OTHER, ANSWER], 1)]


def test_contrastive_rule_picks_the_forget_only_neuron_on_a_toy_model():
    model, adapter = specialised_toy()
    site = adapter.site("language", 0)
    cfg = AttributionConfig(steps=8, top_k=1, batch_items=3)
    # the paper's rule: per-item top-1, then the union; every forget item's top neuron is the shared one
    paths = path_search(model, adapter, FORGET, "language", cfg, pad_token_id=0)
    union = {n.neuron for item in paths for n in item if n.layer == 0}
    assert union == {0}
    forget = dense_scores(model, adapter, FORGET, "language", cfg, pad_token_id=0)
    retain = dense_scores(model, adapter, RETAIN, "language", cfg, pad_token_id=0)
    assert (forget[site][:, 1] > 0).all() and retain[site][:, 1].abs().max() < 1e-6  # neuron 1: forget only
    assert (retain[site][:, 0] > 0).all()  # neuron 0 serves the retain items too
    assert contrastive_selection(forget, retain, {site: 1}) == {site: [1]}


IMG = [[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]]


def request_data() -> UnlearnData:
    forget = [toy_example([1, 2, 3, 4], 2), toy_example([IMAGE, 2, 1], 1, image=IMG), toy_example([3, 2, 4], 1)]
    retain = [toy_example([3, 1, 2, 2, 4], 2), toy_example([2, 4], 1)]
    return UnlearnData(forget, retain, 0, ["text", "multimodal", "text"], ["text", "text"],
                       forget_requests=["a", "b", "a"])


def two_request_graph() -> PathGraph:
    return PathGraph("t", (GraphNode("language", 0, 1, 2, 0.5, 0.4, ("a",)),
                           GraphNode("language", 1, 2, 1, 0.3, 0.3, ("a", "b")),
                           GraphNode("vision", 1, 0, 1, 0.2, 0.2, ("b",))))


def test_graph_and_data_split_per_request():
    graph, data = two_request_graph(), request_data()
    assert graph.requests() == ["a", "b"]
    assert graph.for_request("b").by_site() == {("language", 1): [2], ("vision", 1): [0]}
    assert data.request_ids() == ["a", "b"]
    only_a = data.only_request("a")
    assert len(only_a.forget) == 2 and list(only_a.forget_modality) == ["text", "text"] and only_a.retain == data.retain
    with pytest.raises(InputError, match="forget_requests"):
        UnlearnData(data.forget, data.retain, 0, forget_requests=["a"])
    with pytest.raises(InputError, match="request id"):
        UnlearnData(data.forget, data.retain, 0).request_ids()


def test_per_request_edit_trains_each_request_on_its_own_neurons_with_the_same_budget():
    model, adapter = toy()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = EditConfig(per_request=True, rmisu=RMisUConfig(layer=1, steps=7, batch_size=2, lr=5e-2))
    summary = MipEditor(cfg).run(model, adapter, request_data(), graph=two_request_graph(), log=lambda _: None)
    assert summary.details["per_request"] == {"a": {"language.0": 1, "language.1": 1},
                                              "b": {"language.1": 1, "vision.1": 1}}
    assert summary.steps == 6  # 7 // 2 per request: never more than the union edit's budget
    assert {p["request"] for p in summary.curve} == {0, 1}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {"language.0.mlp.gate_proj.weight", "language.0.mlp.up_proj.weight",
                       "language.0.mlp.down_proj.weight", "language.1.mlp.gate_proj.weight",
                       "language.1.mlp.up_proj.weight", "language.1.mlp.down_proj.weight", "vision.1.mlp.fc1.weight",
                       "vision.1.mlp.fc1.bias", "vision.1.mlp.fc2.weight"}
    w = model.language[0].mlp.down_proj.weight
    assert torch.equal(w[:, [0, 2]], base["language.0.mlp.down_proj.weight"][:, [0, 2]])  # only neuron 1 moved


def test_random_control_draws_other_neurons_for_each_request():
    _, adapter = toy()
    graph = PathGraph("t", (GraphNode("language", 0, 1, 1, 0.5, 0.5, ("a",)),))
    site = adapter.site("language", 0)
    draws = [tuple(RandomControl(seed=0).select(adapter, graph, key=k)[site]) for k in range(8)]
    assert draws[0] == tuple(RandomControl(seed=0).select(adapter, graph, key=0)[site])  # seeded
    assert len(set(draws)) > 1  # the request's key changes the draw


def test_per_request_targets_share_one_direction_per_request():
    data = request_data()
    assert _direction_index(data, "input") == [0, 1, 2]
    assert _direction_index(data, "request") == [0, 1, 0]
    assert _direction_index(UnlearnData(data.forget, data.retain, 0), "request") == [0, 1, 2]  # no request ids
    with pytest.raises(InputError, match="target_per"):
        RMisUConfig(target_per="person")


def test_no_biases_keeps_the_vision_biases():
    model, adapter = toy()
    b1 = model.vision[1].mlp.fc1.bias.detach().clone()
    cfg = EditConfig(train_biases=False, rmisu=RMisUConfig(layer=1, steps=5, batch_size=2, lr=5e-2))
    MipEditor(cfg).run(model, adapter, request_data(), graph=two_request_graph(), log=lambda _: None)
    assert torch.equal(model.vision[1].mlp.fc1.bias.detach(), b1)
    assert not torch.equal(model.vision[1].mlp.fc1.weight.detach()[0], toy()[0].vision[1].mlp.fc1.weight[0])


def test_paper_variant_is_kept_under_its_own_name_and_overrides_keep_its_settings():
    m = get_method("mip_paper", edit_overrides={"rmisu": {"steps": 10}})
    assert isinstance(m, MipPaper)
    assert m.config.prune and m.config.rmisu.layer_fraction == 0.2 and m.config.rmisu.retain_weight == 1.0
    assert m.config.rmisu.retain_ce_weight == 0.0 and m.config.rmisu.steps == 10
    assert get_method("mip").config.rmisu.layer_fraction != 0.2
    with pytest.raises(InputError, match="EditConfig"):
        get_method("mip", edit_overrides={"not_a_field": 1})
