"""Neuron-delta versions: the base's files linked, the edited neurons' slices in one small file, loaded and
exported to exactly the edited weights, refused by plain ``from_pretrained``.

Measured facts only: inode numbers and file sizes on disk, tensors read back by ``load_model``, by plain
``from_pretrained`` on the export, and the error plain ``from_pretrained`` raises on a delta version.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mip_core.modeling import load_model
from mip_core.modeling.deltas import delta_targets, export_plain, write_delta
from mip_core.modeling.shards import BASE_PREFIX, MANIFEST, edited_parameters, plan_shards, read_manifest, write_edited

SITES = {"language.1": [0, 2, 5], "vision.0": [1]}  # the neurons the test edits


def _save_sharded(tiny_models, folder: Path) -> int:
    model, processor = tiny_models["qwen2_5_vl"]
    model.save_pretrained(folder, max_shard_size="100KB")
    processor.save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _edit(loaded, neuron_ids, shift: float) -> None:
    """Change every slice a neuron edit of ``neuron_ids`` may change (input rows and biases, down columns)."""
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name, kind, ids in delta_targets(loaded.model, loaded.adapter, neuron_ids):
            if kind == "rows":
                params[name][ids] += shift
            else:
                params[name][:, ids] -= shift


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(want: dict[str, torch.Tensor], model) -> None:
    got = model.state_dict()
    assert set(want) == set(got)
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert different == []


def _new_bytes(base: Path, out: Path) -> int:
    """Bytes of ``out``'s files that are not hard links of a file in ``base`` (what the write really stored)."""
    inodes = {(p.stat().st_ino, p.stat().st_dev) for p in base.iterdir()}
    return sum(p.stat().st_size for p in out.iterdir() if (p.stat().st_ino, p.stat().st_dev) not in inodes)


def test_a_delta_version_links_its_base_and_loads_as_the_edited_model(tiny_models, tmp_path):
    base, v2, v3 = tmp_path / "base", tmp_path / "v2", tmp_path / "v3"
    model_bytes = _save_sharded(tiny_models, base)
    loaded = load_model(str(base))
    _edit(loaded, SITES, 0.5)
    write_delta(loaded.model, loaded.adapter, SITES, str(base), str(v2))
    want_v2 = _state(loaded.model)

    manifest = read_manifest(v2)
    assert manifest["deltas"] == ["neuron-delta-0001.safetensors"]
    assert (v2 / (BASE_PREFIX + "model.safetensors.index.json")).is_file()
    assert not (v2 / "model.safetensors.index.json").exists()
    assert _new_bytes(base, v2) < 0.05 * model_bytes  # 4 of the MLP neurons: the slices, not the shards
    for f in base.iterdir():
        dest = v2 / (BASE_PREFIX + f.name if f.name == "model.safetensors.index.json" else f.name)
        assert os.path.samefile(f, dest), f.name  # every base file a hard link, none rewritten

    with pytest.raises(OSError, match="model.safetensors"):  # plain transformers refuses, never loads the base
        type(loaded.model).from_pretrained(v2)
    _assert_same(want_v2, load_model(str(v2)).model)

    # the next night's edit on top of v2: a second delta, applied after the first
    again = load_model(str(v2))
    more = {"language.1": [2, 7], "language.0": [3]}
    _edit(again, more, 0.25)
    write_delta(again.model, again.adapter, more, str(v2), str(v3))
    assert read_manifest(v3)["deltas"] == ["neuron-delta-0001.safetensors", "neuron-delta-0002.safetensors"]
    want_v3 = _state(again.model)
    assert not all(torch.equal(want_v2[k], want_v3[k]) for k in want_v2)
    _assert_same(want_v3, load_model(str(v3)).model)

    plain = tmp_path / "plain"
    done = export_plain(str(v3), str(plain))
    assert done["rewritten"] and done["link"]  # only shards holding an edited tensor are rewritten
    assert not (plain / MANIFEST).exists()
    _assert_same(want_v3, type(loaded.model).from_pretrained(plain))


def test_a_plain_version_written_over_a_delta_version_needs_no_deltas(tiny_models, tmp_path):
    """The full format over a delta base rewrites every tensor a delta touched, with the deltas applied."""
    base, v2, v3 = tmp_path / "base", tmp_path / "v2", tmp_path / "v3"
    _save_sharded(tiny_models, base)
    loaded = load_model(str(base))
    _edit(loaded, SITES, 0.5)
    write_delta(loaded.model, loaded.adapter, SITES, str(base), str(v2))
    again = load_model(str(v2))
    more = {"language.0": [3]}
    _edit(again, more, 0.25)
    names = edited_parameters(again.model, again.adapter, {"per_site": {"language.0": 1}})
    write_edited(again.model, plan_shards(again.model, names, str(v2)), str(v3))
    assert read_manifest(v3) is None and (v3 / "model.safetensors.index.json").is_file()
    assert not any(p.name.startswith("neuron-delta") for p in v3.iterdir())
    _assert_same(_state(again.model), type(loaded.model).from_pretrained(v3))


def test_a_published_delta_version_is_exported_by_the_cli_as_a_plain_checkpoint(tiny_models, tmp_path, capsys):
    from mip_core.cli import main
    from mip_core.service.store import ServiceStore

    base, edited = tmp_path / "base", tmp_path / "edited"
    _save_sharded(tiny_models, base)
    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("m", str(base), dataset_uri=str(tmp_path / "bench"))
    loaded = load_model(store.uri(store.model_key("m", "v0001")))
    _edit(loaded, SITES, 0.5)
    write_delta(loaded.model, loaded.adapter, SITES, loaded.path, str(edited))
    assert store.register_model("m", str(edited), dataset_uri=str(tmp_path / "bench")) == "v0002"
    card = store.read_text("models/m/v0002/model_card.md")
    assert "mip models export m --version v0002 --out exports/m-v0002" in card  # the card says how to serve it

    out = tmp_path / "served"
    assert main(["models", "export", "m", "--out", str(out), "--root", str(tmp_path / "store")]) == 0
    assert "exported m v0002" in capsys.readouterr().out
    _assert_same(_state(loaded.model), type(loaded.model).from_pretrained(out))
    assert main(["models", "export", "m", "--version", "v0009", "--out", str(out),
                 "--root", str(tmp_path / "store")]) == 2
    assert "--version v0009" in capsys.readouterr().err
