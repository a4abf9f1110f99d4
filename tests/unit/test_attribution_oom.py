"""Running out of memory during attribution raises instead of turning items into failures.

The toy model's embedding gets a real forward hook that fails the way an allocator does: it raises
``torch.OutOfMemoryError`` (CUDA's error), ``MemoryError``, or makes torch's CPU allocator fail for real with a
request larger than the address space.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from toy_models import toy, toy_example

from mip_core.attribution import AttributionConfig, path_search
from mip_core.attribution.items import EncodedItem, attribute_examples
from mip_core.errors import AttributionOOM

STEPS = 2
TEXT = [toy_example([1, 2, 3, 4, 2], 2), toy_example([3, 1, 2], 1), toy_example([4, 4, 1, 3, 2, 1, 3], 3)]
ITEMS = [EncodedItem(f"t{i}", "language", ex) for i, ex in enumerate(TEXT)]
CFG = AttributionConfig(steps=STEPS, top_k=1, batch_items=3)


def cuda_oom() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


def host_oom() -> None:
    raise MemoryError()


def cpu_allocator_oom() -> None:
    torch.empty(2**62, dtype=torch.uint8)  # beyond any address space: the real DefaultCPUAllocator error


def fail_passes(model: torch.nn.Module, fail: Callable[[], None], *, over_rows: int) -> list[int]:
    """Make every forward with more than ``over_rows`` rows fail with ``fail``; returns the rows seen."""
    seen: list[int] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(int(args[0].shape[0]))
        if seen[-1] > over_rows:
            fail()

    model.embed.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("fail", [cuda_oom, host_oom, cpu_allocator_oom])
def test_a_pass_too_big_is_resplit_one_item_per_pass(fail):
    model, adapter = toy()
    expected = path_search(model, adapter, TEXT, "language", CFG)
    seen = fail_passes(model, fail, over_rows=STEPS)  # one item (STEPS rows) fits, two do not
    paths, failures = attribute_examples(model, adapter, ITEMS, CFG, pad_token_id=0)
    assert failures == []
    assert [p.item_id for p in paths] == ["t0", "t1", "t2"]
    assert [[n.neuron for n in p.nodes] for p in paths] == [[n.neuron for n in e] for e in expected]
    assert seen[0] == 3 * STEPS and max(seen[1:]) == STEPS  # the 3-item pass failed, then one item at a time


@pytest.mark.parametrize("fail", [cuda_oom, host_oom, cpu_allocator_oom])
def test_an_item_that_does_not_fit_alone_raises_naming_it_the_device_and_the_fix(fail):
    model, adapter = toy()
    fail_passes(model, fail, over_rows=0)
    with pytest.raises(AttributionOOM) as info:
        attribute_examples(model, adapter, ITEMS, CFG, pad_token_id=0)
    message = str(info.value)
    assert "item 't0'" in message and "language" in message and "device(s) cpu" in message
    assert "gpus_per_actor" in message and "batch_items (now 3)" in message
    assert "not an item failure" in message
    assert all(not adapter.down_proj(s)._forward_pre_hooks for s in adapter.sites())  # the search's hooks are gone


def test_a_single_item_pass_that_runs_out_raises_at_once():
    model, adapter = toy()
    seen = fail_passes(model, cuda_oom, over_rows=0)
    with pytest.raises(AttributionOOM, match="item 't1'"):
        attribute_examples(model, adapter, ITEMS[1:2], CFG, pad_token_id=0)
    assert seen == [STEPS]  # one attempt, no pointless retry of the same pass


def test_other_errors_still_fail_only_their_item():
    """A non-memory error in a pass keeps the old behaviour: the item that fails alone is a failure."""
    model, adapter = toy()

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if (args[0] == 4).any():  # token 4 occurs in t0 and t2 only
            raise RuntimeError("bad token")

    model.embed.register_forward_pre_hook(hook)
    paths, failures = attribute_examples(model, adapter, ITEMS, CFG, pad_token_id=0)
    assert [p.item_id for p in paths] == ["t1"]
    assert [f.item_id for f in failures] == ["t0", "t2"] and "bad token" in failures[0].reason
