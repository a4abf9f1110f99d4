"""The `mip` commands end to end on tiny models, through the real CLI entry point."""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest

from mip_core.benchmark import load_benchmark, make_benchmark
from mip_core.cli import main
from mip_core.modeling import load_model, save_model
from mip_core.parquet_io import read_item_paths, read_path_graph


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("cli")
    make_benchmark(root / "bench", 8, seed=0, n_utility=8)
    model, processor = tiny_models["qwen2_5_vl"]
    save_model(model, processor, str(root / "model"))
    return root


def test_attribute_reduce_show(workdir, capsys):
    bench = load_benchmark(workdir / "bench")
    forget = bench.split_items("forget", forget_pct=15)
    text = [it.item_id for it in forget if it.modality == "text"][:2]
    image = [it.item_id for it in forget if it.modality == "multimodal"][:1]
    out = workdir / "paths"
    code = main(["attribute", "--model", str(workdir / "model"), "--bench", str(workdir / "bench"),
                 "--forget", "15", "--items", ",".join(text + image), "--top-k", "3", "--steps", "2",
                 "--request-id", "req-1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    paths = read_item_paths(str(out))
    assert sorted(p.item_id for p in paths) == sorted(text + image)
    assert {p.tower for p in paths} == {"language", "vision"}
    assert all(p.request_id == "req-1" for p in paths)
    assert ds.dataset(str(out), partitioning="hive").count_rows() == 2 * 2 * 3 + 1 * 2 * 3  # items x layers x k

    assert main(["paths", "reduce", str(out), "--out", str(workdir / "graph")]) == 0
    graph = read_path_graph(str(workdir / "graph"))
    assert set(graph.towers()) == {"language", "vision"}
    assert all(node.request_ids == ("req-1",) for node in graph.nodes)
    capsys.readouterr()
    assert main(["paths", "show", str(workdir / "graph")]) == 0
    shown = capsys.readouterr().out
    assert "language L0" in shown and "vision" in shown and "union=" in shown


def test_attribute_rejects_unknown_items_and_reports_failures(workdir, capsys):
    code = main(["attribute", "--model", str(workdir / "model"), "--bench", str(workdir / "bench"),
                 "--items", "p9999-hobby-text-qa", "--out", str(workdir / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "p9999-hobby-text-qa" in err and "--items" in err
    code = main(["attribute", "--model", str(workdir / "model"), "--bench", str(workdir / "bench"),
                 "--rule", "simpson", "--out", str(workdir / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "rule" in err and "gauss_legendre" in err and "--rule" in err
    assert not (workdir / "nope").exists()


def test_model_tiny_benchmark_make_and_eval_with_reference(tmp_path, capsys):
    assert main(["model", "tiny", "--arch", "llava", "--size", "test", "--out", str(tmp_path / "m")]) == 0
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.model.config.model_type == "llava"
    assert main(["benchmark", "make", "--out", str(tmp_path / "b"), "--profiles", "6", "--seed", "1"]) == 0
    ref = tmp_path / "ref.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--bench", str(tmp_path / "b"), "--forget", "15",
                 "--splits", "forget", "retain", "--json", str(ref)]) == 0
    rows = json.loads(ref.read_text())["rows"]
    assert {(r["split"], r["modality"], r["task"], r["metric"]) for r in rows} == {
        (s, m, t, metric) for s in ("forget", "retain") for m in ("multimodal", "text")
        for t, metric in (("mc", "accuracy"), ("gen", "rougeL"))}
    assert all(set(r) == {"split", "modality", "task", "metric", "value", "n"} and r["n"] > 0 for r in rows)
    capsys.readouterr()
    # the same model against itself: nothing forgotten, everything retained (where the reference is non-zero)
    assert main(["eval", "--model", str(tmp_path / "m"), "--bench", str(tmp_path / "b"), "--forget", "15",
                 "--splits", "forget", "retain", "--reference", str(ref), "--json", str(tmp_path / "rel.json")]) == 0
    assert "forgetting_rate" in capsys.readouterr().out
    rel = json.loads((tmp_path / "rel.json").read_text())["rows"]
    by_metric = {}
    for r in rel:
        by_metric.setdefault(r["metric"], []).append(r["value"])
    assert all(v == 0.0 for v in by_metric["forgetting_rate"] if v == v)  # NaN where the reference scored 0
    assert all(v == 1.0 for v in by_metric["retention"] if v == v)


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "none"), "--bench", str(tmp_path / "none")]) == 2
    assert "mip benchmark make" in capsys.readouterr().err
    (tmp_path / "ref.json").write_text("{}")
    assert main(["eval", "--model", "m", "--bench", "b", "--reference", str(tmp_path / "ref.json")]) == 2
    assert "not a `mip eval --json` file" in capsys.readouterr().err


def test_models_register_checks_its_sources_and_stores_absolute_paths(workdir, capsys, monkeypatch):
    from mip_core.service.store import ServiceStore

    root = str(workdir / "reg-store")
    code = main(["models", "register", "--root", root, "--name", "m", "--model", str(workdir / "model"),
                 "--dataset", "does/not/exist"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mip: error: --dataset ") and "does not exist" in err
    assert err.count("\n") == 1  # one line, not a traceback
    code = main(["models", "register", "--root", root, "--name", "m", "--model", str(workdir / "nope"),
                 "--dataset", str(workdir / "bench")])
    assert code == 2 and capsys.readouterr().err.startswith("mip: error: --model ")
    assert ServiceStore(root).models() == []  # nothing registered by either

    monkeypatch.chdir(workdir)  # relative paths, as typed in a checkout
    assert main(["models", "register", "--root", root, "--name", "m", "--model", "model", "--dataset", "bench"]) == 0
    info = ServiceStore(root).model_info("m")
    assert info["dataset_uri"] == str(workdir / "bench") and info["source_uri"] == str(workdir / "model")
    monkeypatch.chdir("/")  # still resolves from elsewhere: what a worker or an actor does
    assert load_benchmark(info["dataset_uri"]).manifest.n_profiles == 8
    card = ServiceStore(root).read_text("models/m/v0001/model_card.md")  # how to load it without this project
    assert "AutoProcessor.from_pretrained" in card and "AutoModelForImageTextToText" in card and info["uri"] in card


def test_submit_of_a_binary_file_is_one_line_error(workdir, capsys):
    blob = workdir / "photo.jpg"
    blob.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)))
    code = main(["submit", str(blob), "--root", str(workdir / "bin-store")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mip: error: request file ") and "is not UTF-8 text" in err
    assert err.count("\n") == 1


def test_benchmark_export_then_register_with_keepsets(workdir, tmp_path, capsys, monkeypatch):
    from mip_core.service.items import ItemTable, load_items
    from mip_core.service.keepsets import DEFAULT_TEMPLATES, keepset_subjects, read_templates
    from mip_core.service.store import ServiceStore

    plain = tmp_path / "plain"
    assert main(["benchmark", "export", "--bench", str(workdir / "bench"), "--out", str(plain)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {plain / 'retain.jsonl'}: " in out and "--retain" in out
    root = str(tmp_path / "store")
    model = str(workdir / "model")
    base = ["models", "register", "--root", root, "--name", "m", "--model", model]
    # exactly one of --dataset or the --retain/--utility pair
    for extra, words in (([], "no dataset: give --dataset BENCH"),
                         (["--retain", str(plain / "retain.jsonl")], "--utility missing"),
                         (["--dataset", str(workdir / "bench"), "--retain", "r"],
                          "--dataset and --retain exclude")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert words in err and "--retain R --utility U" in err, err
    # a bad utility file: every file's problems at once, nothing registered
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a", "subject": "Ada"}\n')
    assert main(base + ["--retain", str(plain / "retain.jsonl"), "--utility", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"--utility: invalid utility keep-set {tmp_path / 'bad.jsonl'}" in err and ":1: subject:" in err
    assert ServiceStore(root).models() == []

    monkeypatch.chdir(plain)  # relative paths, resolved once at registration
    assert main(base + ["--retain", "retain.jsonl", "--utility", "utility.jsonl", "--templates",
                        "templates.jsonl"]) == 0
    assert "keep-set retain: " in capsys.readouterr().out
    monkeypatch.chdir("/")
    store = ServiceStore(root)
    info = store.model_info("m")
    assert info["dataset_uri"] is None and set(info["keepsets"]) == {"retain", "utility", "templates"}
    assert info["keepsets"]["retain"] == store.uri("models/m/keepsets/v0001/retain")
    retain, utility = load_items(info["keepsets"]["retain"]), load_items(info["keepsets"]["utility"])
    assert isinstance(retain, ItemTable) and isinstance(utility, ItemTable)
    bench = load_benchmark(workdir / "bench")
    assert [it.item_id for it in retain.items] == [it.item_id for it in bench.items if it.kind == "qa"]
    assert len(utility.items) == sum(it.kind == "utility" for it in bench.items)
    assert keepset_subjects(retain) == {p.profile_id: p.name for p in bench.profiles}
    assert len(read_templates(info["keepsets"]["templates"])) == len(read_templates(plain / "templates.jsonl"))
    assert "keep-set retain:" in store.read_text("models/m/v0001/model_card.md")
    assert store.versions("m") == ["v0001"]  # the keepsets folder is not taken for a version
    # without --templates the defaults are stored; --dataset still works as before for the next version
    assert main(base + ["--retain", str(plain / "retain.jsonl"), "--utility", str(plain / "utility.jsonl")]) == 0
    assert read_templates(store.model_info("m", "v0002")["keepsets"]["templates"]) == list(DEFAULT_TEMPLATES)
    assert main(base + ["--dataset", str(workdir / "bench")]) == 0
    info = store.model_info("m")
    assert "keepsets" not in info and info["dataset_uri"] == str(workdir / "bench")
