"""Neuron-restricted editing on the hand-weighted toy VLM: slices, merge, pruning, selection rules, RMisU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from toy_models import IMAGE, toy, toy_example

from mip_core.editing import METHOD_NAMES
from mip_core.editing.base import UnlearnData
from mip_core.editing.methods import METHODS, EditConfig, MipEditor, RandomControl, get_method
from mip_core.editing.rmisu import RMisUConfig, hidden_at, run_rmisu, sphere, trainable_only
from mip_core.editing.selection import all_neurons, manu_scores, manu_selection, random_like, up_to_layer
from mip_core.editing.slices import NeuronEditor, check_selection, prune_columns
from mip_core.errors import InputError
from mip_core.hooks import patch
from mip_core.modeling.inputs import collate
from mip_core.path_graph import GraphNode, PathGraph

IMG = [[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]]
IMG2 = [[-0.4, 0.2, 0.6], [0.1, -0.3, 0.2]]


def examples() -> tuple[list[dict], list[dict]]:
    forget = [toy_example([1, 2, 3, 4], 2), toy_example([IMAGE, 2, 1], 1, image=IMG)]
    retain = [toy_example([3, 1, 2, 2, 4], 2), toy_example([IMAGE, 3, 4], 1, image=IMG2), toy_example([2, 4], 1)]
    return forget, retain


def logits(model, exs) -> torch.Tensor:
    batch = collate(exs, 0)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


def selection(adapter):
    return {adapter.site("language", 0): [1], adapter.site("language", 1): [0, 2], adapter.site("vision", 1): [0, 2]}


def perturb(editor: NeuronEditor, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.slices.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def allowed_mask(adapter, sel) -> dict[str, torch.Tensor]:
    """Per parameter name: True where a selected neuron's slice lives (rows, bias entries, down columns)."""
    model = adapter.model
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    for site, ids in sel.items():
        for lin in adapter.neuron_inputs(site):
            masks[names[id(lin.weight)]][ids] = True
            if lin.bias is not None:
                masks[names[id(lin.bias)]][ids] = True
        masks[names[id(adapter.down_proj(site).weight)]][:, ids] = True
    return masks


def test_attached_editor_is_the_identity_until_trained_and_disabled_is_the_base():
    model, adapter = toy()
    forget, retain = examples()
    before = logits(model, forget + retain)
    with NeuronEditor(adapter, selection(adapter)) as editor:
        assert torch.allclose(logits(model, forget + retain), before, atol=1e-6)
        perturb(editor)
        edited = logits(model, forget + retain)
        assert not torch.allclose(edited, before, atol=1e-3)
        with editor.disabled():
            assert torch.equal(logits(model, forget + retain), before)
    assert torch.equal(logits(model, forget + retain), before), "detaching must leave the base model as it was"


def test_merge_round_trip_gives_the_attached_outputs_and_changes_only_the_slices():
    model, adapter = toy()
    forget, retain = examples()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sel = selection(adapter)
    with NeuronEditor(adapter, sel) as editor:
        perturb(editor)
        attached = logits(model, forget + retain)
        editor.merge()
    assert torch.allclose(logits(model, forget + retain), attached, atol=1e-5)
    masks = allowed_mask(adapter, sel)
    changed_somewhere = 0
    for name, p in model.named_parameters():
        diff = p.detach() != base[name]
        assert not (diff & ~masks[name]).any(), f"{name} changed outside the selected neurons' slices"
        changed_somewhere += int(diff.any())
    # every selected slice moved: gate/up rows of both language layers, fc1 rows + bias and fc2 of vision 1
    assert changed_somewhere == 2 * 3 + 3
    assert torch.equal(model.vision[1].mlp.fc2.bias, base["vision.1.mlp.fc2.bias"]), "the down bias is no slice"
    with pytest.raises(RuntimeError, match="already"):
        editor.merge()


def test_trainable_slices_hold_only_the_selected_neurons():
    _model, adapter = toy()
    editor = NeuronEditor(adapter, selection(adapter))
    state = {f"{sl.site.tower}.{sl.site.layer}.{name}": p for sl in editor.slices for name, p in sl.named_parameters()}
    assert state["vision.1.rows.0"].shape == (2, 3) and state["vision.1.row_biases.0"].shape == (2,)
    assert state["language.1.columns"].shape == (4, 2)
    assert editor.n_trainable() == (2 * 4 + 4) + 2 * (2 * 2 * 4 + 2 * 4) // 2 + (2 * 3 + 2 + 3 * 2)


def test_pruned_checkpoint_matches_hook_based_zeroing():
    forget, retain = examples()
    model, adapter = toy()
    sel = selection(adapter)
    idx = {site: torch.tensor(ids) for site, ids in sel.items()}

    def zero(site, a):
        out = a.clone()
        out[..., idx[site]] = 0
        return out

    with patch(adapter, {site: zero for site in sel}):
        hooked = logits(model, forget + retain)
    assert prune_columns(adapter, sel) == sum(adapter.down_proj(s).weight.shape[0] * len(i) for s, i in sel.items())
    assert torch.allclose(logits(model, forget + retain), hooked, atol=1e-6)
    # the editor's prune (zero-initialised columns), merged untrained, is the same checkpoint
    model2, adapter2 = toy()
    with NeuronEditor(adapter2, selection(adapter2), prune=True) as editor:
        assert torch.allclose(logits(model2, forget + retain), hooked, atol=1e-6)
        editor.merge()
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


def test_selection_is_checked_against_the_model():
    _model, adapter = toy()
    site = adapter.site("language", 0)
    with pytest.raises(InputError, match="outside 0..2"):
        check_selection(adapter, {site: [3]})
    other = type(site)("language", 7, 3)
    with pytest.raises(InputError, match="does not have"):
        check_selection(adapter, {other: [0]})
    with pytest.raises(InputError, match="empty selection"):
        NeuronEditor(adapter, {site: []})
    assert check_selection(adapter, {site: [2, 0, 2]}) == {site: [0, 2]}


def test_random_control_keeps_counts_per_site_and_is_seeded():
    _model, adapter = toy()
    sel = selection(adapter)
    a, b, c = (random_like(adapter, sel, seed=s) for s in (0, 0, 1))
    assert a == b and {s: len(v) for s, v in a.items()} == {s: len(v) for s, v in sel.items()}
    big = {s: list(range(0, s.d_mlp, 2)) for s in adapter.sites()}
    draws = [random_like(adapter, {s: v[:1] for s, v in big.items()}, seed=s) for s in range(12)]
    assert len({tuple(map(tuple, d.values())) for d in draws}) > 1, "different seeds must draw different neurons"
    assert c.keys() == sel.keys()


def test_full_rmisu_selects_every_mlp_below_the_layer():
    _model, adapter = toy()
    full = all_neurons(adapter, language_up_to=0)
    assert sorted((s.tower, s.layer) for s in full) == [("language", 0), ("vision", 0), ("vision", 1)]
    assert all(v == list(range(s.d_mlp)) for s, v in full.items())
    assert sorted((s.tower, s.layer) for s in up_to_layer(selection(adapter), 0)) == [("language", 0), ("vision", 1)]


def test_manu_ranks_forget_specific_neurons_first():
    site_a = type(toy()[1].site("language", 0))("language", 0, 3)
    ones = torch.ones(3, dtype=torch.float64)
    def stats(v):
        return {"abs": v, "freq": v, "var": v, "rms": v, "n": ones * 5}

    forget = {site_a: stats(torch.tensor([1.0, 1.0, 0.2], dtype=torch.float64))}
    retain = {site_a: stats(torch.tensor([1.0, 0.1, 0.2], dtype=torch.float64))}
    scores = manu_scores(forget, retain)
    assert int(scores[site_a].argmax()) == 1  # active on the forget set, quiet on the retain set
    text_only = manu_scores({site_a: stats(torch.tensor([0.1, 0.1, 2.0], dtype=torch.float64))}, retain)
    assert manu_selection([scores, text_only], {site_a: 2}) == {site_a: [1, 2]}  # max over modalities


def test_hidden_at_stops_after_the_layer():
    model, adapter = toy()
    forget, _ = examples()
    calls = []
    handle = model.language[1].register_forward_hook(lambda *a: calls.append(1))
    batch = collate(forget, 0)
    batch.pop("labels")
    h = hidden_at(model, adapter.block(adapter.site("language", 0)), batch)
    handle.remove()
    assert h.shape == (2, 4, 4) and calls == []


def test_sphere_directions_are_unit_and_seeded():
    u = sphere(5, 16, seed=3)
    assert torch.allclose(u.norm(dim=-1), torch.ones(5))
    assert torch.equal(u, sphere(5, 16, seed=3)) and not torch.equal(u, sphere(5, 16, seed=4))


def _data() -> UnlearnData:
    forget, retain = examples()
    return UnlearnData(forget, retain, 0, ["text", "multimodal"], ["text", "multimodal", "text"])


def test_rmisu_moves_forget_representations_and_only_the_selected_slices():
    model, adapter = toy()
    data = _data()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    block = adapter.block(adapter.site("language", 1))
    fb = collate(list(data.forget), 0)
    fb.pop("labels")
    h_before = hidden_at(model, block, fb).detach()
    sel = selection(adapter)
    editor = NeuronEditor(adapter, sel, prune=False)
    params = editor.trainable_parameters()
    cfg = RMisUConfig(layer=1, steps=60, lr=5e-2, batch_size=2, retain_weight=1.0, target_scale=3.0, check_every=0)
    with editor, trainable_only(model, params):
        curve, layer = run_rmisu(model, adapter, data, params, cfg, reference=editor.disabled, log=lambda _: None)
        editor.merge()
    assert layer == 1
    assert curve[-1]["forget"] < 0.8 * curve[0]["forget"], curve
    h_after = hidden_at(model, block, fb).detach()
    assert (h_after - h_before).norm() > 0.1 * h_before.norm()
    masks = allowed_mask(adapter, sel)
    for name, p in model.named_parameters():
        assert not ((p.detach() != base[name]) & ~masks[name]).any(), name
        assert p.requires_grad, "trainable_only must restore the flags"


def test_rmisu_config_is_validated_and_resolves_the_layer():
    with pytest.raises(InputError, match="RMisUConfig.lr"):
        RMisUConfig(lr=0)
    assert RMisUConfig(layer_fraction=0.2).resolve_layer(36) == 7 and RMisUConfig().resolve_layer(4) == 3
    with pytest.raises(InputError, match="has 2 layers"):
        RMisUConfig(layer=5).resolve_layer(2)


def test_registry_names_match_the_light_list_and_build():
    assert tuple(METHODS) == METHOD_NAMES
    m = get_method("random", rmisu=RMisUConfig(steps=3), edit_overrides={"prune": False}, seed=4)
    assert isinstance(m, RandomControl) and m.seed == 4 and m.config.rmisu.steps == 3 and not m.config.prune
    assert get_method("rmu", edit_overrides={"prune": True}).config.prune is False
    assert get_method("mip", edit_overrides={"prune": True}).config.prune is True
    with pytest.raises(InputError, match="unknown method"):
        get_method("nope")


def test_path_methods_need_a_graph_and_run_on_it():
    model, adapter = toy()
    data = _data()
    method = MipEditor(EditConfig(rmisu=RMisUConfig(layer=1, steps=5, batch_size=2)))
    with pytest.raises(InputError, match="needs a path graph"):
        method.run(model, adapter, data, graph=None)
    graph = PathGraph("t", (GraphNode("language", 0, 1, 1, 0.5, 0.5), GraphNode("vision", 1, 2, 1, 0.2, 0.2)))
    summary = method.run(model, adapter, data, graph=graph, log=lambda _: None)
    assert summary.details["per_site"] == {"language.0": 1, "vision.1": 1}
    assert float(model.language[0].mlp.down_proj.weight[:, 1].detach().abs().sum()) != 0  # pruned, then retrained


def test_retain_prefix_lengths_stop_where_forget_inputs_differ_and_at_images():
    from mip_core.editing.rmisu import retain_prefix_lengths

    forget = [toy_example([1, 2, 3, 4], 2), toy_example([1, IMAGE, 2, 1], 1, image=IMG), toy_example([4, 4], 1)]
    retain = [toy_example([1, 2, 4, 4], 2), toy_example([1, IMAGE, 2, 1], 1, image=IMG2), toy_example([1], 0)]
    # [1, 2] shared; the image token stands for other pixels, so the prefix stops before it; nothing shared
    assert retain_prefix_lengths(forget, retain, IMAGE) == [2, 1, 0]
    assert retain_prefix_lengths(forget, retain, None) == [2, 4, 0]
    assert retain_prefix_lengths(forget, [], IMAGE) == [0, 0, 0]


def test_every_registered_method_declares_whether_it_needs_a_graph():
    for name, cls in METHODS.items():
        assert isinstance(cls.needs_graph, bool), name
        assert callable(cls().run), name


def test_contrastive_rule_picks_forget_only_neurons_over_shared_ones():
    from mip_core.editing.selection import contrastive_scores, contrastive_selection

    site = toy()[1].site("language", 0)
    # neuron 0 serves forget and retain items alike (the strongest for both), neuron 1 serves only the forget
    # items, neuron 2 nobody; scores differ in scale from item to item, as real attribution scores do
    forget = torch.tensor([[1.0, 0.8, 0.0], [100.0, 90.0, 1.0], [1e-3, 5e-4, 0.0]])
    retain = torch.tensor([[2.0, 0.0, 0.1], [50.0, 1.0, 0.0], [1e-4, 0.0, 0.0], [3.0, 0.1, 0.0]])
    scores = contrastive_scores(forget, retain)
    assert int(scores.argmax()) == 1 and abs(float(scores[0])) < 0.1
    assert contrastive_selection({site: forget}, {site: retain}, {site: 1}) == {site: [1]}
    # the union of per-item top-1 picks neuron 0 for every forget item: the shared one
    assert set(forget.argmax(1).tolist()) == {0}


def test_dense_scores_rank_like_the_path_search():
    from mip_core.attribution import AttributionConfig
    from mip_core.attribution.path_search import path_search
    from mip_core.editing.selection import dense_scores

    model, adapter = toy()
    forget, retain = examples()
    text = [forget[0], retain[0], retain[2]]
    cfg = AttributionConfig(steps=3, top_k=1, batch_items=2)
    dense = dense_scores(model, adapter, text, "language", cfg, pad_token_id=0)
    nodes = path_search(model, adapter, text, "language", cfg, pad_token_id=0)
    for site, scores in dense.items():
        assert scores.shape == (3, 3)
        for b in range(3):
            top = [n for n in nodes[b] if n.layer == site.layer][0]
            assert int(scores[b].argmax()) == top.neuron and float(scores[b].max()) == pytest.approx(top.score)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """``prompt`` and the toy's greedy continuation of ``n`` tokens: an answer the model says."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits(model, [toy_example(ids, 0)])[0, -1].argmax()))
    return ids


def test_still_said_is_the_share_of_answers_greedy_decoding_writes():
    from mip_core.editing.rmisu import still_said

    model, _ = toy()
    ids = greedy(model, [1, 2], 3)
    wrong = (ids[2] + 1) % 6  # any other first answer token
    endless = ids[:4] + [(ids[4] + 1) % 6]  # the answer said, a different end token: still said
    data = UnlearnData([toy_example(ids, 3), toy_example(endless, 3), toy_example(ids[:2] + [wrong, ids[3], ids[4]], 3)],
                       [], 0, ["text"] * 3, [])
    assert still_said(model, data, torch.device("cpu"), batch_size=2) == pytest.approx(2 / 3)


def test_rmisu_with_check_every_stops_once_no_forget_answer_is_said():
    from mip_core.editing.rmisu import still_said

    def edit(check_every: int) -> tuple[list[dict], float]:
        model, adapter = toy()
        forget = [toy_example(greedy(model, prompt, 2), 2) for prompt in ([1, 2], [3, 1])]  # answers it says
        data = UnlearnData(forget, examples()[1], 0, ["text"] * 2, ["text", "multimodal", "text"])
        editor = NeuronEditor(adapter, selection(adapter), prune=False)
        params = editor.trainable_parameters()
        cfg = RMisUConfig(layer=1, steps=200, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0,
                          check_every=check_every, check="said", after_forgotten="stop")
        with editor, trainable_only(model, params):
            before = still_said(model, data, torch.device("cpu"), 2)
            curve, _ = run_rmisu(model, adapter, data, params, cfg, reference=editor.disabled, log=lambda _: None)
            return curve, before, still_said(model, data, torch.device("cpu"), 2)

    curve, before, after = edit(check_every=5)
    assert before == 1 and after == 0 and curve[-1]["said"] == 0 and curve[-1]["step"] < 200
    assert edit(check_every=0)[0][-1]["step"] == 200  # off: the whole budget


def with_options(model, prompt: list[int], right: bool, image=None, tokens=(1, 2, 3, 4)
                 ) -> tuple[dict, tuple[list[dict], int]]:
    """A one-token-answer forget item on ``prompt`` with options ``tokens``: the right option is the one the toy
    ranks first (``right``) or last, so its multiple-choice verdict is known by construction."""
    tokens = list(tokens)
    last = logits(model, [toy_example(prompt, 0, image=image)])[0, -1]
    ranked = sorted(tokens, key=lambda t: -float(last[t]))
    answer = ranked[0] if right else ranked[-1]
    options = [toy_example([*prompt, t], 1, image=image) for t in tokens]
    return toy_example([*prompt, answer], 1, image=image), (options, tokens.index(answer))


def test_still_known_counts_right_choices_beyond_chance_per_modality_and_free_form_answers_said():
    from mip_core.editing.rmisu import still_known

    model, _ = toy()
    text = [with_options(model, p, right=False) for p in ([1, 2], [3, 1], [2, 2], [4, 1])]  # 0 of 4: chance is 1
    image = [with_options(model, [IMAGE, 2], right=True, image=IMG)]  # 1 of 1: 0.75 beyond chance
    free = toy_example(greedy(model, [2, 3], 2), 2)  # free-form, said
    forget = [ex for ex, _ in text + image] + [free]
    options = [o for _, o in text + image] + [((), -1)]
    data = UnlearnData(forget, [], 0, ["text"] * 4 + ["multimodal", "text"], [], forget_options=options)
    # per modality: text max(0, 0 - 4/4) = 0, multimodal 1 - 1/4 = 0.75; the free-form answer said: 1
    assert still_known(model, data, torch.device("cpu"), batch_size=3) == pytest.approx((0.75 + 1) / 6)
    # pooled, text below chance would have hidden the multimodal item: 1 - 5/4 < 0
    two_right = [with_options(model, p, right=True) for p in ([1, 2], [3, 1])]
    data = UnlearnData([ex for ex, _ in two_right + text], [], 0, ["text"] * 6, [],
                       forget_options=[o for _, o in two_right + text])
    assert still_known(model, data, torch.device("cpu"), batch_size=4) == pytest.approx((2 - 6 / 4) / 6)


def test_still_known_reads_exactly_chance_as_forgotten_with_any_number_of_options():
    from mip_core.editing.rmisu import still_known

    model, _ = toy()
    # 1 of 3 right with 3 options each is exactly chance; in floats (1 - 1/3) - 1/3 - 1/3 is 1.1e-16, not 0
    items = [with_options(model, p, right=r, tokens=(1, 2, 3)) for p, r in (([1, 2], True), ([3, 1], False),
                                                                           ([2, 2], False))]
    data = UnlearnData([ex for ex, _ in items], [], 0, ["text"] * 3, [], forget_options=[o for _, o in items])
    assert still_known(model, data, torch.device("cpu"), batch_size=2) == 0


def known_choices_edit():
    """The toy, 4 text forget items whose right options it ranks first (all known), the retain examples, and an
    editor on ``selection``: what an edit checked by multiple choice starts from."""
    model, adapter = toy()
    items = [with_options(model, p, right=True) for p in ([1, 2], [3, 1], [2, 2], [4, 1])]
    data = UnlearnData([ex for ex, _ in items], examples()[1], 0, ["text"] * 4, ["text", "multimodal", "text"],
                       forget_options=[o for _, o in items])
    editor = NeuronEditor(adapter, selection(adapter), prune=False)
    return model, adapter, data, editor, editor.trainable_parameters()


def test_rmisu_checked_by_choice_stops_at_chance_not_below_it():
    from mip_core.editing.rmisu import still_known

    model, adapter, data, editor, params = known_choices_edit()
    cfg = RMisUConfig(layer=1, steps=200, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0, check_every=5,
                      check="choice", after_forgotten="stop")
    with editor, trainable_only(model, params):
        before = still_known(model, data, torch.device("cpu"), 2)
        curve, _ = run_rmisu(model, adapter, data, params, cfg, reference=editor.disabled, log=lambda _: None)
        after = still_known(model, data, torch.device("cpu"), 2)
    assert before == pytest.approx(3 / 4)  # 4 right of 4, 1 by chance
    checks = [p for p in curve if "known" in p]
    assert after == 0 and checks[-1]["known"] == 0 and all(p["known"] > 0 for p in checks[:-1])
    assert curve[-1]["step"] < 200  # stopped at the first check that found them at chance


def test_rmisu_default_check_holds_the_forget_items_at_chance_and_repairs_with_the_rest_of_the_budget():
    """The default: checked by multiple choice, the forget term off once the items score at chance, on again when a
    check finds them known; the whole budget is spent and the edit ends with them at chance."""
    from mip_core.editing.rmisu import still_known

    model, adapter, data, editor, params = known_choices_edit()
    defaults = RMisUConfig()
    assert (defaults.check, defaults.after_forgotten, defaults.check_every) == ("choice", "repair", 10)
    cfg = RMisUConfig(layer=1, steps=120, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0, check_every=5)
    lines: list[str] = []
    with editor, trainable_only(model, params):
        curve, _ = run_rmisu(model, adapter, data, params, cfg, reference=editor.disabled, log=lines.append)
        at_end = still_known(model, data, torch.device("cpu"), 2)
    checks = [p for p in curve if "known" in p]
    first_at_chance = next(p["step"] for p in checks if p["known"] == 0)
    assert curve[-1]["step"] == 120 and first_at_chance < 120
    repaired = [p for p in curve if p["step"] > first_at_chance and "forget" not in p]
    assert repaired and all("retain" in p for p in repaired)  # retain terms alone once at chance
    # on the toy the repair lets the items come back (measured: at steps 25 and 105); each time the check turns
    # the forget term back on, and the next point pushes again
    relapses = [b["step"] for a, b in zip(checks, checks[1:]) if a["known"] == 0 < b["known"] and b["step"] < 120]
    assert relapses
    for step in relapses:
        assert "forget" in next(p for p in curve if p["step"] > step)
    assert sum("known again" in line for line in lines) >= len(relapses)
    assert at_end == checks[-1]["known"]  # the last check is the state the edit ends in (step 120 is a check)


def with_earlier(model, adapter, tonight, earlier):
    """UnlearnData of ``tonight``'s and then ``earlier``'s ``with_options`` items (all text), the earlier ones
    flagged as people an earlier edit forgot, and an editor on ``selection``."""
    items = [*tonight, *earlier]
    data = UnlearnData([ex for ex, _ in items], examples()[1], 0, ["text"] * len(items),
                       ["text", "multimodal", "text"], forget_options=[o for _, o in items],
                       forget_earlier=[False] * len(tonight) + [True] * len(earlier))
    editor = NeuronEditor(adapter, selection(adapter), prune=False)
    return data, editor, editor.trainable_parameters()


def test_rmisu_whose_budget_runs_out_on_a_relapse_ends_at_the_last_check_that_found_them_forgotten():
    """Repair can let the items come back right at the end, with no steps left to push them again: the edit then
    ends at the weights of the last check at chance, to the bit those of the same edit given only that budget."""
    from mip_core.editing.rmisu import still_known

    def edit(steps: int) -> tuple[list[dict], list[torch.Tensor], float]:
        model, adapter, data, editor, params = known_choices_edit()
        cfg = RMisUConfig(layer=1, steps=steps, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0,
                          check_every=5)
        with editor, trainable_only(model, params):
            curve, _ = run_rmisu(model, adapter, data, params, cfg, reference=editor.disabled, log=lambda _: None)
            return curve, [p.detach().clone() for p in params], still_known(model, data, torch.device("cpu"), 2)

    checks = [(p["step"], p["known"]) for p in edit(120)[0] if "known" in p]
    # the first relapse on this CPU (the toy's trajectory differs between CPUs in the last bits)
    at_chance, relapse = next((a[0], b[0]) for a, b in zip(checks, checks[1:]) if a[1] == 0 < b[1])
    curve, weights, known_at_end = edit(relapse)
    assert curve[-1]["known"] > 0 and curve[-1]["back_to_step"] == at_chance and known_at_end == 0
    curve_then, weights_then, _ = edit(at_chance)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_then, strict=True))
    assert "back_to_step" not in curve_then[-1]  # a budget that ends at chance keeps its last weights


def test_rmisu_leaves_people_forgotten_earlier_alone_while_every_check_finds_them_forgotten():
    """Items an earlier edit forgot join the forget term only when a check finds them known: while they stay at
    chance, the edit is the one it would be without them, to the bit (the same draws and target directions)."""
    cfg = RMisUConfig(layer=1, steps=60, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0, check_every=5)
    weights, curves = [], []
    for guarded in (True, False):
        model, adapter = toy()
        tonight = [with_options(model, p, right=True) for p in ([1, 2], [3, 1], [2, 2], [4, 1])]
        # the right option is the three wrong ones' answer and one token more, so its summed log-probability is
        # theirs plus that token's, always lower: answered wrong at every check, whatever the edit does. (Four
        # identical options relied on an exact tie, which float noise between batch rows breaks on some CPUs.)
        pairs = [(toy_example([*p, 3], 1), toy_example([*p, 3, 1], 2)) for p in ([2, 3], [4, 4])]
        earlier = [(wrong, ([wrong, longer, wrong, wrong], 1)) for wrong, longer in pairs]
        data, editor, params = with_earlier(model, adapter, tonight, earlier)
        with editor, trainable_only(model, params):
            curve, _ = run_rmisu(model, adapter, data if guarded else data.only_forget(range(4)), params, cfg,
                                 reference=editor.disabled, log=lambda _: None)
            editor.merge()
        weights.append([p.detach().clone() for p in model.parameters()])
        curves.append(curve)
    checked = [p for p in curves[0] if "known" in p]
    assert len(checked) == 12 and all(p["known_earlier"] == 0 for p in checked)
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    assert [p["forget"] for p in curves[0] if "forget" in p] == [p["forget"] for p in curves[1] if "forget" in p]


def test_rmisu_forgets_again_people_forgotten_earlier_that_a_check_finds_known():
    """Tonight's items already at chance, people forgotten earlier known again: checked apart, the earlier group
    turns the forget term on for its items, and an edit that stops once forgotten stops only when both groups are
    at chance. Without them in the data the same edit stops at once and leaves them known."""
    from mip_core.editing.rmisu import still_known

    # the check's mechanics alone: on a 4-token toy, keeping tonight's wrong options likely (the plausibility term)
    # also lifts the tokens the earlier items answer with
    cfg = RMisUConfig(layer=1, steps=120, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0, check_every=5,
                      after_forgotten="stop", plausible_weight=0.0)
    ends = {}
    for guarded in (True, False):
        model, adapter = toy()
        tonight = [with_options(model, p, right=False) for p in ([1, 2], [3, 1], [2, 2], [4, 1])]
        earlier = [with_options(model, p, right=True) for p in ([2, 3], [4, 4], [1, 4], [3, 3])]
        data, editor, params = with_earlier(model, adapter, tonight, earlier)
        them = data.only_forget(range(4, 8))
        lines: list[str] = []
        with editor, trainable_only(model, params):
            assert still_known(model, them, torch.device("cpu"), 2) == pytest.approx(3 / 4)  # 4 of 4 right
            curve, _ = run_rmisu(model, adapter, data if guarded else data.only_forget(range(4)), params, cfg,
                                 reference=editor.disabled, log=lines.append)
            ends[guarded] = (curve, still_known(model, them, torch.device("cpu"), 2), lines)
    curve, at_end, lines = ends[True]
    checks = [p for p in curve if "known" in p]
    assert checks[-1]["known"] == checks[-1]["known_earlier"] == at_end == 0
    assert all(p["known"] > 0 or p["known_earlier"] > 0 for p in checks[:-1])
    assert any("their items join the forget term" in line for line in lines)
    unguarded_curve, unguarded_end, _ = ends[False]
    assert unguarded_curve[-1]["step"] < curve[-1]["step"] and unguarded_end > 0  # measured: step 15, 0.25 known


def test_target_directions_of_an_edit_stay_the_same_when_people_forgotten_earlier_join_it():
    """One direction per request (several examples each): this edit's rows are ``sphere(n, D, seed)`` with or
    without earlier people, whose rows come from ``seed + 1``."""
    from mip_core.editing.rmisu import _directions

    alone = _directions([0, 0, 0, 1, 1], (), 8, 3)
    assert torch.equal(alone, sphere(2, 8, 3))
    joined = _directions([0, 0, 0, 1, 1, 2, 2, 3], [False] * 5 + [True] * 3, 8, 3)
    assert torch.equal(joined[:2], alone) and torch.equal(joined[2:], sphere(2, 8, 4))


def test_a_check_pushes_only_the_people_forgotten_earlier_who_came_back():
    """The earlier group turns on as the gate would see it (per modality pooled, or one person beyond luck); what
    the forget term then draws is the items of the people known again on their own items, not of those still at
    chance."""
    from mip_core.editing.rmisu import EARLIER, TONIGHT, _Run

    model, adapter = toy()
    tonight = [with_options(model, p, right=True) for p in ([1, 2], [3, 1])]
    never = [(ex, ([ex] * 4, 1)) for ex in (toy_example([*p, 3], 1) for p in ([2, 3], [4, 4]))]  # ties: wrong
    prompts = [[1, 4], [3, 3], [2, 1], [4, 2]]
    cases = {"one came back": [with_options(model, p, right=True) for p in prompts[:2]],
             "at chance pooled": [with_options(model, [1, 4], right=True), with_options(model, [3, 3], right=False)],
             "one beyond luck, pooled at chance": [with_options(model, p, right=True) for p in prompts]}
    for case, other in cases.items():
        a = never * (6 if case.startswith("one beyond") else 1)  # a: every item wrong (tied options)
        data, editor, _ = with_earlier(model, adapter, tonight, [*a, *other])
        data = replace(data, forget_requests=["t", "t"] + ["a"] * len(a) + ["b"] * len(other))
        run = _Run(model, adapter, data, RMisUConfig(layer=1, batch_size=2, check_every=5), editor.disabled)
        curve: list[dict[str, float]] = []
        known = run.record({"step": 5}, 4, 0.0, curve, lambda _: None)
        b_at = list(range(2 + len(a), 2 + len(a) + len(other)))
        if case == "one came back":
            # text, pooled: a's 2 x (0 - 1/4) and b's 2 x (1 - 1/4) = 1.0 beyond chance, over 4 items
            assert curve[-1]["known_earlier"] == pytest.approx(1.0 / 4) and curve[-1]["back_earlier"] == 1
            assert known[EARLIER] == 1 and run.relapsed == {"b"}
            assert run.pool({TONIGHT, EARLIER}) == [0, 1, *b_at] and run.pool({EARLIER}) == b_at
        elif case == "at chance pooled":
            # b is 1 of 2 right: 2 x (-1/4) + (3/4 - 1/4) = 0 pooled, and guessing gets 1 of 2 with 1 - (3/4)^2 =
            # 0.44 > 0.1, so the group stays off and no one is drawn
            assert known[EARLIER] == 0 and run.relapsed == set() and run.pool({TONIGHT, EARLIER}) == [0, 1]
        else:  # a's 12 x (-1/4) and b's 4 x (3/4) = 0 pooled; b's 4 of 4 right by guessing: (1/4)^4 = 0.004 < 0.1
            assert curve[-1]["known_earlier"] == 0 and known[EARLIER] == 1 and run.relapsed == {"b"}
            assert run.pool({EARLIER}) == b_at


def test_rmisu_repair_spends_the_rest_of_the_budget_on_the_retain_terms():
    from mip_core.editing.rmisu import still_said

    model, adapter = toy()
    forget = [toy_example(greedy(model, prompt, 2), 2) for prompt in ([1, 2], [3, 1])]  # answers it says
    data = UnlearnData(forget, examples()[1], 0, ["text"] * 2, ["text", "multimodal", "text"])
    editor = NeuronEditor(adapter, selection(adapter), prune=False)
    params = editor.trainable_parameters()
    cfg = RMisUConfig(layer=1, steps=60, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0, check_every=5,
                      check="said", after_forgotten="repair")
    lines: list[str] = []
    with editor, trainable_only(model, params):
        curve, _ = run_rmisu(model, adapter, data, params, cfg, reference=editor.disabled, log=lines.append)
        said_at_end = still_said(model, data, torch.device("cpu"), 2)
    checks = [p for p in curve if "said" in p]
    first_forgotten = next(p["step"] for p in checks if p["said"] == 0)
    assert curve[-1]["step"] == 60 and first_forgotten < 60  # the whole budget, though forgotten early
    # after a check finds nothing said, the logged steps carry no forget term until a check finds an answer again
    switched_off = [p for p in curve if p["step"] > first_forgotten and "forget" not in p]
    assert switched_off and all("retain" in p for p in switched_off)
    assert any("retain terms alone from here" in line for line in lines)
    assert said_at_end == 0 or any("known again" in line for line in lines)  # never left said without switching back
    with pytest.raises(InputError, match="after_forgotten='repair' needs a retain term"):
        RMisUConfig(layer=1, after_forgotten="repair", retain_weight=0, retain_ce_weight=0)
    assert RMisUConfig(check_every=0, retain_weight=0, retain_ce_weight=0).after_forgotten == "repair"  # no check


def wrong_option_levels(model, data) -> torch.Tensor:
    """Mean token log-probability of each wrong option of ``data``'s forget items ``[n]``."""
    from mip_core.evaluation.runner import sequence_logprobs

    wrong = [ex for opts, right in data.forget_options for k, ex in enumerate(opts) if k != right]
    return torch.tensor(sequence_logprobs(model, wrong, 0, 8)) / 2  # one answer token and the end token each


def test_rmisu_plausibility_term_keeps_a_forgotten_persons_wrong_options_as_likely_as_before():
    """The push alone makes the wrong options of the forget questions less likely too (a forgotten person's
    questions answered by nothing plausible: the membership attack's tell); with ``plausible_weight`` the same
    edit leaves them less far below their levels before it, and forgets all the same."""
    from mip_core.editing.rmisu import still_known

    shortfall = {}
    for weight in (0.0, 5.0):
        model, adapter, data, editor, params = known_choices_edit()
        before = wrong_option_levels(model, data)
        cfg = RMisUConfig(layer=1, steps=60, lr=0.2, batch_size=2, retain_weight=1.0, target_scale=3.0,
                          check_every=0, plausible_weight=weight)
        with editor, trainable_only(model, params):
            curve, _ = run_rmisu(model, adapter, data, params, cfg, reference=editor.disabled, log=lambda _: None)
            shortfall[weight] = float((before - wrong_option_levels(model, data)).clamp(min=0).mean())
            assert still_known(model, data, torch.device("cpu"), 2) == 0
        assert ("plausible" in curve[-1]) == (weight > 0)
    assert shortfall[0.0] > 0.5 and shortfall[5.0] < shortfall[0.0] / 2
