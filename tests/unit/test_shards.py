"""Sharding of a batch's items across actors and the actors' resource options (pure: no Ray started)."""

from __future__ import annotations

import json
import math

import pytest

from mip_core.errors import InputError
from mip_core.service.shards import ShardResult, actor_options, actors_that_fit, items_per_pass, shard_items


@pytest.mark.parametrize("n_items", [1, 2, 3, 7, 8, 10, 33, 100])
@pytest.mark.parametrize("n_actors", [1, 2, 3, 8, 200])
@pytest.mark.parametrize("max_shard", [None, 1, 3, 16])
def test_shards_cover_every_item_once_contiguously_with_the_expected_size(n_items, n_actors, max_shard):
    shards = shard_items(n_items, n_actors, max_shard=max_shard)
    assert [i for r in shards for i in r] == list(range(n_items))
    assert all(len(r) > 0 and r.step == 1 for r in shards)
    size = math.ceil(n_items / n_actors)
    size = size if max_shard is None else min(size, max_shard)
    assert all(len(r) == size for r in shards[:-1]) and 0 < len(shards[-1]) <= size
    if max_shard is None:
        assert len(shards) <= n_actors  # one shard per actor at most
    else:
        assert max(len(r) for r in shards) <= max_shard


def test_a_cap_gives_more_shards_than_actors():
    assert shard_items(10, 2) == [range(5), range(5, 10)]
    assert shard_items(10, 2, max_shard=3) == [range(3), range(3, 6), range(6, 9), range(9, 10)]
    assert shard_items(3, 8) == [range(1), range(1, 2), range(2, 3)]  # never an empty shard
    assert shard_items(0, 4) == []


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n_items": -1, "n_actors": 2}, "n_items"),
    ({"n_items": 2.0, "n_actors": 2}, "n_items"),
    ({"n_items": True, "n_actors": 2}, "n_items"),
    ({"n_items": 4, "n_actors": 0}, "n_actors"),
    ({"n_items": 4, "n_actors": "2"}, "n_actors"),
    ({"n_items": 4, "n_actors": 2, "max_shard": 0}, "max_shard"),
    ({"n_items": 4, "n_actors": 2, "max_shard": 1.5}, "max_shard"),
])  # fmt: skip
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(InputError, match=name):
        shard_items(**kwargs)


def test_actor_options_one_gpu_each_when_there_are_enough():
    assert actor_options(4, 2) == {"num_gpus": 1, "num_cpus": 1}
    assert actor_options(2, 2, n_cpus_available=2) == {"num_gpus": 1, "num_cpus": 1}
    assert actor_options(1, 2) == {"num_cpus": 1}  # not one per actor: all on CPU, never a mix
    assert actor_options(0.0, 1) == {"num_cpus": 1}


def test_actor_options_on_cpu_leave_one_cpu_to_the_driver():
    assert actor_options(0, 2, n_cpus_available=2) == {"num_cpus": 0.5}  # the 2-core box
    assert actor_options(0, 3, n_cpus_available=2) == {"num_cpus": 0.33}
    assert actor_options(0, 4, n_cpus_available=64) == {"num_cpus": 1.0}  # never more than one each
    for n_actors, n_cpus in [(2, 2), (3, 2), (7, 3), (5, 16)]:
        share = actor_options(0, n_actors, n_cpus_available=n_cpus)["num_cpus"]
        assert 0 < share and n_actors * share <= n_cpus - 1
    with pytest.raises(InputError, match="n_cpus_available"):
        actor_options(0, 2, n_cpus_available=1)
    with pytest.raises(InputError, match="n_actors"):
        actor_options(0, 0)


def test_multi_gpu_actors_ask_for_their_gpus_and_never_fall_back_to_cpu():
    assert actor_options(8, 2, gpus_per_actor=4) == {"num_gpus": 4, "num_cpus": 1}
    assert actor_options(8, 1, gpus_per_actor=8, n_cpus_available=2) == {"num_gpus": 8, "num_cpus": 1}
    assert actor_options(0, 2, gpus_per_actor=4, n_cpus_available=2) == {"num_cpus": 0.5}  # a CPU cluster
    with pytest.raises(InputError, match=r"gpus_per_actor=4 GPUs need 8 GPUs; the cluster has 6"):
        actor_options(6, 2, gpus_per_actor=4)
    with pytest.raises(InputError, match="gpus_per_actor"):
        actor_options(8, 2, gpus_per_actor=0)


def test_fewer_multi_gpu_actors_when_they_would_not_all_fit():
    assert actors_that_fit(8, 4, 4) == 2
    assert actors_that_fit(8, 1, 4) == 1
    assert actors_that_fit(9, 8, 2) == 4
    assert actors_that_fit(2, 3, 4) == 3  # not even one fits: actor_options then names the shortfall
    assert actors_that_fit(1, 2, 1) == 2 and actors_that_fit(0, 2, 4) == 2  # single-GPU and CPU: unchanged
    assert actor_options(8, actors_that_fit(8, 4, 4), gpus_per_actor=4) == {"num_gpus": 4, "num_cpus": 1}


def test_items_per_pass_is_the_configured_value_lowered_to_what_fits():
    # one row of one site (d_model 100, d_mlp 400) in bf16: (8 * 100 + 3 * 400) * 2 = 4000 bytes, no logits;
    # an item is steps 2 x tokens 10 rows = 80,000 bytes; half of 1 MB holds 6.25 items
    plan = dict(steps=2, widths=[(100, 400)], vocab=0, bytes_per_value=2, tokens_per_item=10)
    assert items_per_pass(4, 1e6, **plan) == 4  # the configured value is an upper bound
    assert items_per_pass(8, 1e6, **plan) == 6
    assert items_per_pass(8, 1e5, **plan) == 1  # never 0: a pass that still runs out raises AttributionOOM
    assert items_per_pass(8, 1e6, **{**plan, "vocab": 500}) == 3  # + 2 * 500 * 4 bytes of float32 logits a row
    assert [items_per_pass(64, f, **plan) for f in (1e5, 4e5, 1e6, 4e6)] == [1, 2, 6, 25]


def test_shard_result_round_trips_and_rejects_bad_shapes():
    result = ShardResult(shard=3, uri="s3://b/x/shard-0003", n_items=4, n_paths=5,
                         failures=(("p1-name-mm-qa", "no image"),), seconds=1.5, actor="host:12")
    data = result.to_dict()
    assert data["failures"] == [["p1-name-mm-qa", "no image"]]
    assert ShardResult.from_dict(data) == result
    assert ShardResult.from_dict(json.loads(json.dumps(data))) == result  # JSON-safe
    with pytest.raises(InputError, match="n_paths"):
        ShardResult.from_dict({k: v for k, v in data.items() if k != "n_paths"})
    with pytest.raises(InputError, match="non-negative"):
        ShardResult.from_dict({**data, "n_items": -1})
    with pytest.raises(InputError, match="failures"):
        ShardResult.from_dict({**data, "failures": [["only-one"]]})
