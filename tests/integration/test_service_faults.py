"""A batch that must not be published: the gate holds it back, or a step crashes. Nothing is published, every
request ends failed with its reason (and the gate's metrics), and the report says why.

Real Prefect (the test harness's server), a real local Ray cluster, the in-process edit on the session's trained
tiny model; the store is a local folder (the S3 path is covered by test_service_e2e).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from mip_core.benchmark import load_benchmark
from mip_core.service.requests import ForgetRequest
from mip_core.service.store import ServiceStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BASE = {"n_actors": 1, "launcher": "inprocess", "attribution": {"steps": 2, "top_k": 8}, "retain_limit": 20}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A Prefect test server and a local Ray cluster for this module (shut down after it: other modules start
    their own)."""
    import ray
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay short
    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=180):
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
            try:
                yield
            finally:
                ray.shutdown()
                shutil.rmtree(ray_tmp, ignore_errors=True)


def _store_with_requests(tmp_path, trained_tiny, n: int) -> tuple[ServiceStore, list[str]]:
    model_dir, bench_dir = trained_tiny
    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("tiny", model_dir, dataset_uri=bench_dir)
    people = [p.profile_id for p in load_benchmark(bench_dir).profiles][:n]
    ids = [f"f-{k}" for k in range(n)]
    for rid, person in zip(ids, people, strict=True):
        store.submit(ForgetRequest(request_id=rid, target_model="tiny", subjects=[person], requester="t",
                                   reason="privacy"))
    return store, ids


def test_a_batch_below_the_gate_is_not_published(harness, trained_tiny, tmp_path):
    from flows.params import ServiceSpec
    from flows.service import unlearn_batch

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    # one RMisU step cannot make the model forget: the forgetting floor of 0.9 must stop the batch
    spec = ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"steps": 1}},
                       gate={"min_forgetting": 0.9, "min_retention": 0.0, "min_utility": 0.0})
    result = unlearn_batch(ids, spec)

    assert result["version"] is None
    assert store.versions("tiny") == ["v0001"] and store.current_version("tiny") == "v0001"
    for rid in ids:
        record = store.get(rid)
        assert record.state == "failed" and record.reason.startswith("gate: forget"), record
        assert record.model_version is None and record.batch_id == result["batch_id"]
        assert record.metrics is not None and record.metrics["before"] > 0  # the gate's numbers travel along
        assert record.report_uri == result["report"]
    report = store.read_text(store.batch_key(result["batch_id"], "report.md"))
    assert "**not published**: forget" in report and "publish" not in result["timings"]


def test_a_crashing_step_fails_every_request_and_publishes_nothing(harness, trained_tiny, tmp_path):
    from flows.params import ServiceSpec
    from flows.service import unlearn_batch

    store, ids = _store_with_requests(tmp_path, trained_tiny, 2)
    spec = ServiceSpec(root=store.root, **BASE, edit={"rmisu": {"steps": 0}})  # the edit step raises
    with pytest.raises(RuntimeError, match=r"edit step failed: .*steps") as caught:
        unlearn_batch(ids, spec)

    assert store.versions("tiny") == ["v0001"] and store.current_version("tiny") == "v0001"
    batch_ids = {store.get(rid).batch_id for rid in ids}
    assert len(batch_ids) == 1
    [batch_id] = batch_ids
    for rid in ids:
        record = store.get(rid)
        assert record.state == "failed" and record.reason.startswith("edit step failed:"), record
    assert store.list("pending") == [] and store.list("claimed") == []  # nothing left half-way
    report = store.read_text(store.batch_key(batch_id, "report.md"))
    assert "**failed**: edit step failed" in report and str(caught.value).endswith(
        store.uri(store.batch_key(batch_id, "report.md")))
