"""The Prefect UI, checked in a real browser: headless Debian Chromium driven by Selenium.

A real ``prefect server start`` (UI on, its own home and SQLite database), the ``unlearn-batch`` deployment from
prefect.yaml triggered through the API and run by a real ``prefect worker``; then Chromium opens the run's page
and checks what an operator would look at: the run completed, its summary artifact, the batch's report artifacts
on the batch subflow, and the HTML report with its three figures rendered, each stating the gate's verdict (checked
against the test's own scores of both models). Screenshots go to ``test-artifacts/`` (kept by CI as the test's
artifacts).

The browser is Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs them; ``make test``
does). Without them the test skips, unless ``MIP_REQUIRE_BROWSER`` is set, as ``.ci/run`` does: CI fails instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import gate_verdict
import pytest

from mip_core.benchmark import load_benchmark
from mip_core.service import links
from mip_core.service.requests import ForgetRequest
from mip_core.service.store import ServiceStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = ROOT / "test-artifacts"
# The service's own gate floors. On the session's 1.5 M-parameter test model a batch may pass them or be held back:
# its 10 general image questions share the vision neurons of every person and move by 0.1 an item (measured on
# 2026-12-04: 0.4-0.9 over 30-120 RMisU steps; this spec's batch held back at 0.7). The test does not bet on either:
# it scores both models itself (gate_verdict) and checks the verdict, the requests' records and what the UI shows
# follow. One batch, not split when held back (test_service_faults covers the split): one batch subflow, same time.
SPEC = {"n_actors": 1, "launcher": "inprocess", "attribution": {"steps": 2, "top_k": 8}, "retain_limit": 20,
        "edit": {"rmisu": {"steps": 30}}, "split_held_back": False}


def _need_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    why = f"{', '.join(missing)} not installed: `make browser` installs Debian's chromium and chromium-driver"
    if os.environ.get("MIP_REQUIRE_BROWSER"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on a free port of 127.0.0.1 with the UI (the test harness's server has none)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    _need_browser()
    home = tmp_path_factory.mktemp("prefect-ui-home")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MIP_REPO_DIR"} | {
        "PREFECT_HOME": str(home), "PREFECT_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true"}
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Prefect server did not start in 180 s"
            time.sleep(0.5)
        with temporary_settings({PREFECT_API_URL: f"{url}/api", PREFECT_HOME: str(home),
                                 PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            yield url, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # the machine's network is closed: Chromium's background fetches would only fail (and slow it down)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    SCREENSHOTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _body(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _wait_text(driver, *texts: str, timeout: float = 60) -> None:
    """Wait until the page shows every text; on a timeout keep a screenshot and say what the page did show."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(lambda d: all(t in _body(d) for t in texts))
    except TimeoutException:
        driver.save_screenshot(str(SCREENSHOTS / "failure.png"))
        raise AssertionError(f"{driver.current_url} never showed {texts}; it shows:\n{_body(driver)[-2000:]}"
                             f"\n(screenshot: {SCREENSHOTS / 'failure.png'})") from None


def _artifacts_tab(driver, run_url: str, *keys: str, shot: str) -> None:
    """Open a flow run's page, check it says Completed, open its Artifacts tab and find ``keys`` there."""
    from selenium.webdriver.common.by import By

    driver.get(run_url)
    _wait_text(driver, "Completed")
    driver.find_element(By.CSS_SELECTOR, "li.p-tab#artifacts").click()
    _wait_text(driver, *keys)
    driver.save_screenshot(str(SCREENSHOTS / shot))


def test_unlearn_batch_run_shows_completed_with_its_report_in_the_ui(prefect_server, trained_tiny, browser,
                                                                      tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)
    from prefect.deployments import run_deployment
    from selenium.webdriver.common.by import By

    url, env = prefect_server
    model_dir, bench_dir = trained_tiny
    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("tiny", model_dir, dataset_uri=bench_dir)
    people = [p.profile_id for p in load_benchmark(bench_dir).profiles][2:4]
    ids = [f"ui-{k}" for k in range(len(people))]
    for rid, person in zip(ids, people, strict=True):
        store.submit(ForgetRequest(request_id=rid, target_model="tiny", subjects=[person], requester="t",
                                   reason="privacy"))

    report_server = links.report_server(store, "127.0.0.1", 0)  # `mip report --serve`, on a free port
    report_url = f"http://127.0.0.1:{report_server.server_address[1]}"
    threading.Thread(target=report_server.serve_forever, daemon=True).start()

    # the deployment from prefect.yaml, triggered through the API, run by a real worker
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="mip-process", type="process"))
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "-n", "unlearn-batch"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    run = run_deployment("unlearn-batch/unlearn-batch", timeout=0,
                         parameters={"request_ids": ids, "spec": {**SPEC, "root": store.root}})
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay short
    try:
        worker = subprocess.run(
            [str(BIN / "prefect"), "worker", "start", "--pool", "mip-process", "--run-once"], cwd=tmp_path,
            env=env | {"MIP_REPO_DIR": str(ROOT), "MIP_REPORT_URL": report_url, "MIP_THREADS": "1",
                       "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp, "MIP_CACHE_DIR": str(tmp_path / "cache")},
            capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
        [batch_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert state.is_completed(), f"{state}\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    [batch_id] = {store.get(r).batch_id for r in ids}
    gate = store.read_json(store.batch_key(batch_id, "gate.json"))
    verdict = gate_verdict.measure(store, batch_id)  # the test's own scores of both models, the default floors
    gate_verdict.check(store, batch_id, gate, verdict, "v0002")
    # what the report must say: the version published, or the gate's first reason (its floor) for holding it back
    shown = ("published", "published tiny v0002") if verdict.published else (
        "not published", "not published: held back by the gate")
    why = () if verdict.published else (gate["reasons"][0].split(" (")[0],)

    # the run page: Completed, and the run's summary artifact
    _artifacts_tab(browser, f"{url}/runs/flow-run/{run.id}", "unlearn-batch", shot="unlearn-batch-run.png")
    # the batch subflow's page: Completed, with the report (markdown) and the link to the HTML report
    key = f"batch-{batch_id.lower()}"
    assert batch_run.name == f"batch-{batch_id}"
    _artifacts_tab(browser, f"{url}/runs/flow-run/{batch_run.id}", key, f"{key}-html", shot="batch-run.png")
    # the report artifact's own page renders the markdown tables
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    browser.get(f"{url}/artifacts/artifact/{artifact.id}")
    _wait_text(browser, f"MIP-Editor batch {batch_id}", shown[0], *why, "Evaluation (accuracy")
    browser.save_screenshot(str(SCREENSHOTS / "batch-report-artifact.png"))

    # the HTML report, reached as an operator does: the link artifact's page in the UI, its link clicked (served
    # by `mip report --serve`'s server); self-contained, its three figures decoded by the browser
    with get_client(sync_client=True) as client:
        [link] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{key}-html"])))
    href = f"{report_url}/batches/{batch_id}/report.html"
    assert link.data == f"[report.html ({batch_id})]({href})"  # Prefect stores a link artifact as markdown
    browser.get(f"{url}/artifacts/artifact/{link.id}")
    _wait_text(browser, f"report.html ({batch_id})")
    tabs = set(browser.window_handles)
    browser.find_element(By.CSS_SELECTOR, f'a[href="{href}"]').click()
    new_tabs = set(browser.window_handles) - tabs  # the UI opens links in a new tab
    if new_tabs:
        browser.switch_to.window(new_tabs.pop())
    _wait_text(browser, f"MIP-Editor batch {batch_id}", shown[1], *why, "Run and resources")
    assert browser.current_url == href
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert images == [["accuracy before and after", True], ["path graph heat map", True],
                      ["wall time per step", True]], images
    browser.save_screenshot(str(SCREENSHOTS / "batch-report-html.png"))
    report_server.shutdown()
    report_server.server_close()
