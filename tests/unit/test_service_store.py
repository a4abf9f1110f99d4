"""The service store on a local folder: queue lifecycle, JSON helpers, model registry, atomic writes, CLI.

``check_lifecycle`` and ``check_registry`` take any root: the S3 integration test runs the very same checks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mip_core.errors import ArtifactError, InputError
from mip_core.service.requests import MAX_REQUEST_BYTES, ForgetRequest, parse_request
from mip_core.service.runs import RunLease, write_claim
from mip_core.service.store import ServiceStore


def _req(rid: str, model: str = "demo", **kw) -> ForgetRequest:
    return ForgetRequest.model_validate({"request_id": rid, "target_model": model, "subjects": ["p0001"],
                                         "requester": "dpo", "reason": "privacy", **kw})


def _keys(store: ServiceStore, prefix: str = "requests") -> list[str]:
    base = store.uri().split("://", 1)[-1]
    if store.remote:
        store.fs.invalidate_cache()
    try:
        found = store.fs.find(f"{base}/{prefix}")
    except FileNotFoundError:
        return []
    return sorted(p[len(base) + 1:] for p in found)


def check_lifecycle(store: ServiceStore) -> None:
    first = store.submit(_req("r1"))
    assert first.state == "pending" and first.claimed_at is None
    store.submit(_req("r2"))
    store.submit(_req("r3", model="other"))
    before = _keys(store)
    assert before == ["requests/pending/r1.json", "requests/pending/r2.json", "requests/pending/r3.json"]

    with pytest.raises(InputError, match="request_id='r1' already exists"):
        store.submit(_req("r1", subjects=["p0002"]))
    assert _keys(store) == before and store.get("r1").request.subjects == ["p0001"]  # queue unchanged
    with pytest.raises(InputError, match="'nope' is not in the service store"):
        store.get("nope")

    assert [r.request_id for r in store.list()] == ["r1", "r2", "r3"]
    assert [r.request_id for r in store.list("pending", target_model="demo")] == ["r1", "r2"]

    batch = store.new_batch_id()
    assert re.fullmatch(r"b\d{8}-\d{6}-[0-9a-f]{6}", batch)
    assert batch == batch.lower()  # Prefect artifact keys are lowercase: the key must still contain the id
    claimed = store.claim(["r1", "r2", "missing"], batch)
    assert [(r.request_id, r.state, r.batch_id) for r in claimed] == [("r1", "claimed", batch),
                                                                        ("r2", "claimed", batch)]
    assert store.claim(["r1"], "b-other") == []  # no longer pending: skipped
    assert _keys(store) == ["requests/claimed/r1.json", "requests/claimed/r2.json",
                            "requests/pending/r3.json"]
    assert [r.request_id for r in store.list("claimed")] == ["r1", "r2"]

    done = store.finish("r1", "done", model_version="v0002", report_uri=store.uri(store.batch_key(batch,
                        "report.md")), metrics={"forget_acc": 0.1})
    assert (done.state, done.model_version, done.metrics) == ("done", "v0002", {"forget_acc": 0.1})
    assert done.finished_at is not None and done.claimed_at is not None
    with pytest.raises(InputError, match="already done"):
        store.finish("r1", "failed", reason="late")
    released = store.release("r2")
    assert (released.state, released.batch_id, released.claimed_at) == ("pending", None, None)
    rejected = store.finish("r3", "rejected", reason="unknown subjects ['p9999']")  # straight from pending
    assert store.get("r3").reason == "unknown subjects ['p9999']"
    assert rejected.state == "rejected"
    with pytest.raises(InputError, match="already rejected"):
        store.finish("r3", "done")
    with pytest.raises(InputError, match="finishes as 'done', 'failed' or 'rejected'"):
        store.finish("r2", "claimed")  # type: ignore[arg-type]
    assert _keys(store) == ["requests/done/r1.json", "requests/pending/r2.json", "requests/rejected/r3.json"]
    assert [(r.request_id, r.state) for r in store.list()] == [("r1", "done"), ("r2", "pending"),
                                                               ("r3", "rejected")]
    with pytest.raises(InputError, match="already exists \\(state done"):
        store.submit(_req("r1"))
    assert store.record_uri(store.get("r1")) == store.uri("requests/done/r1.json")

    # JSON helpers by key
    key = store.batch_key(batch, "manifest.json")
    assert key == f"batches/{batch}/manifest.json" and not store.exists(key)
    uri = store.write_json(key, {"requests": ["r1"], "n": 1})
    assert uri == store.uri(key) and store.exists(key)
    assert store.read_json(key) == {"requests": ["r1"], "n": 1}
    store.write_text(store.batch_key(batch, "report.md"), "# ok\n")
    assert store.read_text(f"batches/{batch}/report.md") == "# ok\n"
    with pytest.raises(ArtifactError, match="does not exist"):
        store.read_json("batches/none.json")
    with pytest.raises(InputError):
        store.write_text("batches/../../escape.txt", "x")


def check_registry(store: ServiceStore, source_uri: str) -> None:
    assert store.current_version("demo") is None and store.versions("demo") == []
    assert store.next_version("demo") == "v0001"
    with pytest.raises(InputError, match="'demo' is not registered.*known models: none"):
        store.model_info("demo")
    v1 = store.register_model("demo", source_uri, dataset_uri="bench://x")
    assert v1 == "v0001" and store.current_version("demo") == "v0001"
    v2 = store.register_model("demo", source_uri, dataset_uri="bench://x", card="# edited\n",
                              lineage={"batch_id": "b1", "requests": ["r1"], "path_graph": "pg://1"})
    assert v2 == "v0002" and store.versions("demo") == ["v0001", "v0002"]
    assert store.next_version("demo") == "v0003"
    info = store.model_info("demo")
    assert {k: info[k] for k in ("version", "parent_version", "dataset_uri", "batch_id", "requests",
                                 "path_graph")} == {
        "version": "v0002", "parent_version": "v0001", "dataset_uri": "bench://x", "batch_id": "b1",
        "requests": ["r1"], "path_graph": "pg://1"}
    assert info["uri"] == store.uri(store.model_key("demo", "v0002"))
    assert store.model_info("demo", "v0001")["parent_version"] is None
    files = _keys(store, "models/demo")
    assert "models/demo/v0002/config.json" in files and "models/demo/v0002/sub/w.bin" in files
    assert store.read_text("models/demo/v0002/model_card.md") == "# edited\n"
    assert "v0001" in store.read_text("models/demo/v0001/model_card.md")
    assert store.read_bytes("models/demo/v0002/sub/w.bin") == bytes(range(256)) * 10
    store.set_current("demo", "v0001", reason="rollback")
    pointer = store.read_json("models/demo/CURRENT.json")
    assert pointer["version"] == "v0001" and pointer["reason"] == "rollback" and "published_at" in pointer
    with pytest.raises(InputError, match="no version 'v0009'"):
        store.set_current("demo", "v0009")
    with pytest.raises(InputError, match="known models: \\['demo'\\]"):
        store.model_info("ghost")


def _model_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "tiny"}')
    (path / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    return path


def test_lifecycle_local(tmp_path):
    store = ServiceStore(str(tmp_path / "store"))
    assert store.uri("a/b.json") == str(tmp_path / "store" / "a" / "b.json")
    check_lifecycle(store)
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert modes == {"0o644"}  # atomic writes (temp file + rename) leave the same mode as any other file
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_registry_local(tmp_path):
    check_registry(ServiceStore(str(tmp_path / "store")), str(_model_folder(tmp_path / "src")))


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    store = ServiceStore(str(tmp_path))
    store.write_json("x/a.json", {"v": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_json("x/a.json", {"v": 2})
    monkeypatch.undo()
    assert store.read_json("x/a.json") == {"v": 1}
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["a.json"]  # no temp file left


def test_bad_ids_and_keys(tmp_path):
    store = ServiceStore(str(tmp_path))
    with pytest.raises(InputError, match="batch_id='a/b' is not a valid id"):
        store.batch_key("a/b", "x")
    with pytest.raises(InputError, match="model name"):
        store.model_key("../m", "v0001")
    with pytest.raises(InputError, match="versions look like 'v0001'"):
        store.model_key("m", "1")
    with pytest.raises(InputError, match="state='nope'"):
        store.list("nope")  # type: ignore[arg-type]


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_submit_and_list(tmp_path, capsys, monkeypatch):
    from mip_core.cli import main

    root = str(tmp_path / "store")
    good = tmp_path / "req.json"
    good.write_text(json.dumps({"request_id": "cli-1", "target_model": "demo", "subjects": ["p0002"],
                                "requester": "dpo", "reason": "right_to_be_forgotten"}))
    assert main(["submit", str(good), "--root", root]) == 2  # no model `demo` in this store yet
    assert "target_model='demo' is not a registered model" in capsys.readouterr().err
    assert not (tmp_path / "store" / "requests").exists()
    ServiceStore(root).register_model("demo", str(_model_folder(tmp_path / "src")), dataset_uri="/d")
    assert main(["submit", str(good), "--root", root]) == 0
    out = capsys.readouterr().out
    assert "queued cli-1" in out and str(tmp_path / "store" / "requests" / "pending" / "cli-1.json") in out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"request_id": "a/b", "target_model": "demo", "requester": "dpo",
                               "reason": "privacy", "subject": ["p1"]}))
    assert main(["submit", str(bad), "--root", root]) == 2
    err = capsys.readouterr().err
    assert "request_id: 'a/b' is not a valid id" in err and "subject: unknown field" in err
    assert main(["submit", str(good), "--root", root]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["submit", str(tmp_path / "none.json"), "--root", root]) == 2
    assert "cannot read request file" in capsys.readouterr().err

    monkeypatch.setenv("MIP_ROOT", root)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(good.read_text().replace("cli-1", "cli-2")))
    assert main(["submit", "-"]) == 0
    capsys.readouterr()
    assert main(["requests", "--state", "pending"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["cli-1", "pending"], ["cli-2", "pending"]]
    assert main(["requests", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["request"]["request_id"] for r in records] == ["cli-1", "cli-2"]
    assert sorted(p.name for p in (tmp_path / "store" / "requests" / "pending").iterdir()) == [
        "cli-1.json", "cli-2.json"]

    assert main(["schema", "request"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "ForgetRequest"


def test_cli_status_traces_a_request(tmp_path, capsys):
    root = str(tmp_path / "store")
    store = ServiceStore(root)
    for rid in ("s1", "s2", "s3"):
        store.submit(_req(rid, model="m2" if rid == "s3" else "demo"))
    store.claim(["s1", "s2"], "b1")
    store.finish("s1", "done", model_version="v0002", report_uri=store.uri("batches/b1/report.md"),
                 metrics={"before": 1.0, "after": 0.25})
    store.finish("s2", "failed", reason="gate: retention 0.7 < 0.8")
    store.submit(_req("s4"))
    store.claim(["s4"], "b2")  # its run died: still claimed
    store.submit(_req("s5"))
    store.claim(["s5"], "b3")
    with RunLease(store, ttl_s=60) as live:  # b3's run is alive
        write_claim(store, "b3", "demo", ["s5"], live.run_id)
        check_status(store, root, capsys, live.run_id)


def check_status(store: ServiceStore, root: str, capsys, live_run: str) -> None:
    from mip_core.cli import main

    assert main(["status", "s1", "--root", root]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert {k: v.strip() for k, v in lines.items() if k in ("state", "batch_id", "model_version")} == {
        "state": "done", "batch_id": "b1", "model_version": "v0002"}
    assert "after=0.25" in lines["metrics"] and lines["record"].strip().endswith("requests/done/s1.json")
    assert main(["status", "s2", "--root", root, "--json"]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["state"] == "failed" and trace["reason"].startswith("gate:") and trace["model_version"] is None
    assert trace["submitted_at"] <= trace["claimed_at"] <= trace["finished_at"]  # ISO 8601 UTC sorts as text
    assert main(["status", "--root", root, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["claimed_batches"]["b2"] == {"claimed": 1, "owner": None, "alive": False, "expires_at": None,
                                               "abandon": None}
    b3 = summary["claimed_batches"]["b3"]
    assert (b3["claimed"], b3["owner"], b3["alive"]) == (1, live_run, True) and b3["expires_at"] is not None
    assert summary["by_model"] == {"demo": {"pending": 0, "claimed": 2, "done": 1, "failed": 1, "rejected": 0},
                                   "m2": {"pending": 1, "claimed": 0, "done": 0, "failed": 0, "rejected": 0}}
    assert summary["oldest_pending"] == store.get("s3").submitted_at.isoformat()
    assert main(["status", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "m2\t1\t0\t0\t0\t0" in out and "batch b2: 1 claimed request(s); its run (unknown) is gone" in out
    assert "batch_id=b2" in out and f"batch b3: 1 claimed request(s); run {live_run} is processing it" in out
    assert main(["status", "nope", "--root", root]) == 2
    assert "`mip requests` lists the known ones" in capsys.readouterr().err


def test_target_version_must_exist_at_submit_and_at_planning(tmp_path):
    from mip_core.benchmark import load_benchmark, make_benchmark
    from mip_core.service.batch import plan_batch

    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("demo", str(_model_folder(tmp_path / "src")), dataset_uri="/d")
    store.check_target(_req("ok", target_version="v0001"))
    with pytest.raises(InputError, match=r"target_version='v0009' is not a version of demo \(versions: v0001\); "
                                         "fix it, or leave it out"):
        store.check_target(_req("bad", target_version="v0009"))
    with pytest.raises(InputError, match="target_version"):
        parse_request(json.dumps({**_req("x").model_dump(mode="json"), "target_version": "../v1"}))

    make_benchmark(tmp_path / "bench", 4, 0, image_size=16, n_utility=2)
    bench = load_benchmark(tmp_path / "bench")
    for rid, version in (("old", "v0001"), ("gone", "v0007"), ("any", None)):
        store.submit(_req(rid, target_version=version))
    store.claim(["old", "gone", "any"], "b1")
    manifest = plan_batch("b1", [store.get(r) for r in ("old", "gone", "any")], target_model="demo",
                          base_version="v0001", base_uri="/m", dataset_uri="/d", bench=bench, versions=["v0001"])
    assert manifest.accepted == ["old", "any"] and list(manifest.rejected) == ["gone"]
    # the gate's held-out set: the same facts of the same person asked another way, one per forgotten item
    assert len(manifest.eval_test) == len(manifest.forget) > 0
    assert {i.replace("-test", "-qa") for i in manifest.eval_test} == {i for i, _ in manifest.forget}
    assert "target_version 'v0007' is not a version of demo (versions: v0001)" in manifest.rejected["gone"]


def test_an_oversized_request_is_refused_before_parsing_and_at_submit(tmp_path):
    body = _req("big").model_dump(mode="json") | {"note": "x" * 10}
    text = json.dumps(body)
    assert parse_request(text).request_id == "big"
    padded = text[:-1] + " " * (MAX_REQUEST_BYTES - len(text) + 1) + "}"  # valid JSON, one byte over the limit
    with pytest.raises(InputError, match=rf"{MAX_REQUEST_BYTES + 1:,} bytes is over the {MAX_REQUEST_BYTES:,}-byte "
                                         "limit; split it into several requests"):
        parse_request(padded)
    store = ServiceStore(str(tmp_path / "store"))
    items = [{"question": f"q{k} " + "y" * 3900} for k in range(300)]  # each field valid, the whole too big
    with pytest.raises(InputError, match="over the"):
        store.submit(ForgetRequest.model_validate({**body, "subjects": [], "items": items}))
    assert not (tmp_path / "store" / "requests").exists()


def test_cli_report_prints_the_html_location_and_json(tmp_path, capsys, monkeypatch):
    from mip_core.cli import main

    monkeypatch.delenv("MIP_REPORT_URL", raising=False)

    root = str(tmp_path / "store")
    store = ServiceStore(root)
    store.write_text(store.batch_key("b1", "report.md"), "# MIP-Editor batch `b1`\n")
    assert main(["report", "b1", "--root", root, "--open"]) == 2  # closed before HTML reports existed
    assert "has no HTML report" in capsys.readouterr().err
    store.write_text(store.batch_key("b1", "report.html"), "<!DOCTYPE html>")
    store.write_json(store.batch_key("b1", "gate.json"), {"passed": True})
    link = "http://127.0.0.1:8765/batches/b1/report.html"  # `mip report --serve`: a browser opens http, not file
    how = f"served by `mip report --serve --root {root}` while it runs"
    assert main(["report", "b1", "--root", root, "--open"]) == 0
    assert capsys.readouterr().out == f"{link}\n({how})\n"
    assert main(["report", "b1", "--root", root]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# MIP-Editor batch `b1`") and out.rstrip().endswith(f"html:   {link} ({how})")
    assert main(["report", "b1", "--root", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "batch_id": "b1", "report": store.uri("batches/b1/report.md"), "html": store.uri("batches/b1/report.html"),
        "link": link, "link_expires_at": None, "gate": {"passed": True}}
    assert main(["report", "b9", "--root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mip: error: batch 'b9' has no report")  # one line, what to do


def test_an_unplanned_batch_moves_each_request_to_a_batch_of_its_own_and_says_where(tmp_path):
    from mip_core.service.runs import claimed_batches, owner_of, split_unplanned

    store = ServiceStore(str(tmp_path))
    for rid in ("r1", "r2", "r3"):
        store.submit(_req(rid))
    store.claim(["r1", "r2", "r3"], "b-queued")
    singles = split_unplanned(store, "b-queued", "demo", "run-1", "the lineage is at its floors")
    assert claimed_batches(store) == {b: [r] for b, r in zip(singles, ("r1", "r2", "r3"), strict=True)}
    assert {owner_of(store, b) for b in singles} == {"run-1"}
    assert all(store.get(r).held_back_in == ["b-queued"] for r in ("r1", "r2", "r3"))
    report = store.read_text(store.batch_key("b-queued", "report.md"))
    assert "the lineage is at its floors" in report
    assert all(f"| `{r}` | retried in `{b}` |" in report for r, b in zip(("r1", "r2", "r3"), singles, strict=True))
    assert split_unplanned(store, singles[0], "demo", "run-1", "again") == []  # one request: stays as it is
    assert claimed_batches(store)[singles[0]] == ["r1"] and not store.exists(store.batch_key(singles[0], "report.md"))


def test_a_held_back_batch_splits_into_two_claimed_batches_that_remember_it(tmp_path):
    from mip_core.service.report import request_state
    from mip_core.service.runs import claimed_batches, owner_of, split_batch

    store = ServiceStore(str(tmp_path))
    for rid in ("r1", "r2", "r3"):
        store.submit(_req(rid))
    store.claim(["r1", "r2", "r3"], "b-all")
    first, second = split_batch(store, ["r1", "r2", "r3"], "demo", owner="run-1")
    assert claimed_batches(store) == {first: ["r1", "r2"], second: ["r3"]}  # claimed at once: never pending
    assert owner_of(store, first) == owner_of(store, second) == "run-1"
    assert store.get("r3").held_back_in == ["b-all"] and request_state(store.get("r3"), "b-all") == \
        f"retried in `{second}`"
    assert request_state(store.get("r3"), second) == "claimed"
    store.finish("r3", "failed", reason="gate: alone")
    with pytest.raises(InputError, match="only claimed requests move"):
        store.move_to_batch("r3", "b-other")
    with pytest.raises(ValueError, match="cannot be split"):
        split_batch(store, ["r1"], "demo", owner="run-1")
    [alone] = split_batch(store, ["r1"], "demo", owner="run-1", parts=1)  # published without it: retried alone
    assert claimed_batches(store)[alone] == ["r1"] and store.get("r1").held_back_in == ["b-all", first]
