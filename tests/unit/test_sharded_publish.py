"""The edited model is written as its base's shards: only shards holding edited tensors are rewritten, the rest
(and config, processor, tokenizer) are hard links of the base's files; publishing links instead of copying.

Measured facts only: inode numbers and link counts, tensors read back from the files, ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mip_core.errors import InputError
from mip_core.modeling import load_model
from mip_core.modeling.shards import (INDEX_FILE, checkpoint_keys, edited_parameters, plan_shards, weight_map,
                                      write_edited)
from mip_core.transfer import link_or_copy

LAYER = 1  # the language layer whose MLP the test edit changes


def _save_sharded(tiny_models, folder: Path, *, original_format: bool) -> None:
    """The tiny Qwen2.5-VL saved in several shards (hub key format, or the model's state-dict names)."""
    model, processor = tiny_models["qwen2_5_vl"]
    model.save_pretrained(folder, max_shard_size="100KB", save_original_format=original_format)
    processor.save_pretrained(folder)


def _edit_one_mlp(loaded) -> dict[str, object]:
    """Change neurons 0..2 of one language MLP (rows of its inputs, columns of its down projection)."""
    site = loaded.adapter.site("language", LAYER)
    with torch.no_grad():
        for lin in loaded.adapter.neuron_inputs(site):
            lin.weight[:3] += 0.5
        loaded.adapter.down_proj(site).weight[:, :3] -= 0.25
    return {"per_site": {f"language.{LAYER}": 3}}


@pytest.mark.parametrize("original_format", [True, False], ids=["hub-keys", "state-dict-keys"])
def test_only_edited_shards_are_rewritten_and_the_rest_are_hard_links(tiny_models, tmp_path, original_format):
    base, out = tmp_path / "base", tmp_path / "edited"
    _save_sharded(tiny_models, base, original_format=original_format)
    shards = sorted(set(weight_map(base).values()))
    assert len(shards) >= 4, shards  # really sharded
    loaded = load_model(str(base))
    details = _edit_one_mlp(loaded)
    names = edited_parameters(loaded.model, loaded.adapter, details)
    assert names and all(f"layers.{LAYER}.mlp." in n for n in names)
    plan = plan_shards(loaded.model, names, str(base))
    assert 1 <= len(plan.rewrite) < len(shards)
    done = write_edited(loaded.model, plan, str(out))
    assert sorted(done["rewritten"]) == sorted(plan.rewrite) and "copy" not in done

    for f in sorted(p.relative_to(base) for p in base.iterdir()):
        a, b = os.stat(base / f), os.stat(out / f)
        if str(f) in plan.rewrite:
            assert a.st_ino != b.st_ino
        else:  # untouched shards, the index, config, processor, tokenizer: one inode, no bytes written
            assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and b.st_nlink > 1, f
    assert (out / INDEX_FILE).is_file()

    edited_keys = set(checkpoint_keys(loaded.model, names, weight_map(base)).values())
    for shard in plan.rewrite:
        with safe_open(base / shard, "pt") as old, safe_open(out / shard, "pt") as new:
            assert set(old.keys()) == set(new.keys()) and old.metadata() == new.metadata()
            for key in old.keys():
                same = torch.equal(old.get_tensor(key), new.get_tensor(key))
                assert same != (key in edited_keys), key  # others bit-identical, edited ones changed

    reloaded = type(loaded.model).from_pretrained(out)  # plain transformers
    want, got = loaded.model.state_dict(), reloaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_key_that_cannot_be_mapped_is_named(tiny_models, tmp_path):
    model = tiny_models["qwen2_5_vl"][0]
    keys = [n for n, _ in model.named_parameters() if "layers.1.mlp.up_proj" not in n]
    name = next(n for n, _ in model.named_parameters() if "layers.1.mlp.up_proj.weight" in n)
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        checkpoint_keys(model, [name], keys)
    with pytest.raises(InputError, match="safe_serialization"):
        weight_map(tmp_path)


def test_link_or_copy_replaces_and_links(tmp_path):
    src, dest = tmp_path / "a.bin", tmp_path / "v2" / "a.bin"
    src.write_bytes(b"x" * 1000)
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    assert link_or_copy(src, dest) is True
    assert os.stat(dest).st_ino == os.stat(src).st_ino and dest.read_bytes() == b"x" * 1000
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]


def test_publishing_a_batch_output_links_its_files_and_an_outside_folder_is_copied(tiny_models, tmp_path):
    from mip_core.service.store import ServiceStore

    store = ServiceStore(str(tmp_path / "store"))
    edited = Path(store.uri("batches/b1/edited"))
    _save_sharded(tiny_models, edited, original_format=True)
    (edited / ".tmp-model-00001.safetensors").write_bytes(b"half written")  # a crashed writer's leftover
    version = store.register_model("demo", str(edited), dataset_uri="bench://x")
    published = Path(store.uri(f"models/demo/{version}"))
    for f in edited.iterdir():
        if f.name.startswith(".tmp-"):
            assert not (published / f.name).exists()
            continue
        assert os.stat(published / f.name).st_ino == os.stat(f).st_ino, f.name  # no bytes written
    outside = tmp_path / "outside"  # a user's folder: a later in-place save there must not change a version
    _save_sharded(tiny_models, outside, original_format=True)
    v2 = store.register_model("demo", str(outside), dataset_uri="bench://x")
    for f in outside.iterdir():
        copy = Path(store.uri(f"models/demo/{v2}")) / f.name
        assert os.stat(copy).st_ino != os.stat(f).st_ino and copy.read_bytes() == f.read_bytes()
