"""The operator's view (docs/contract.md, "Task-name tag" to "Alerts") in a real browser:
`call-pipeline ui` (the demo CRM, the simulator and `call-pipeline serve`) driven by Playwright in
Debian's headless chromium.

One test walks through what an operator does, a screenshot per step under
`CALL_PIPELINE_TEST_ARTIFACTS` (default `test-artifacts/ui`): the sensors and the schedule are
running; the tasks' Chinese names show; a backfill of two tasks launched by clicking succeeds; the
cloud broken through the simulator's fault endpoint fails a run launched from the Launchpad and the
alert reaches a local webhook (JSON, no phone number); with the fault cleared, a re-execution from
failure clicked on the run page succeeds; its Markdown summary opens on the run page, and the task's
history opens in the asset catalog. Everything is launched by clicking; the test only reads
Dagster's GraphQL to wait for states. Needs /usr/bin/chromium and a CJK font:
`scripts/install-browser.sh` installs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from playwright.sync_api import Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from call_pipeline_tools.simulator.scenarios import build_job_group

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CALL_PIPELINE_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts" / "ui")

JOB = "sync_call_task"
ASSET_PATH = "crm/leads_task_list"
AUTOMATIONS = ("call_task_sensor", "late_jobs_sensor", "failure_alert_sensor", "advance_task_states_schedule")
ACTIVE_STATUSES = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"]
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# Bounds of the waits (seconds): generous for a loaded 2-core machine, never fixed sleeps.
UI_START_S = 240
RUN_S = 240
ALERT_S = 150
UI_TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie (a container's init may never reap an orphan)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 1.0) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, AssertionError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}"
                                 + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(every_s)


class AlertInbox:
    """The alert webhook: a local HTTP server that keeps every POST body."""

    def __init__(self) -> None:
        bodies: list[bytes] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args) -> None:
                pass

        self._bodies, self._lock = bodies, lock
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def bodies(self) -> list[bytes]:
        with self._lock:
            return list(self._bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class UiServer:
    """`call-pipeline ui` on free ports, its output in the artifacts folder; stopped with SIGTERM."""

    def __init__(self, data_dir: Path, alert_url: str, log_path: Path) -> None:
        self.data_dir = data_dir
        self.port, self.sim_port = _free_port(), _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.sim = f"http://127.0.0.1:{self.sim_port}"
        self.home = data_dir / "dagster_home"
        self.log_path = log_path
        script = Path(sys.executable).with_name("call-pipeline")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "call_pipeline.cli"]
        self.command = command + ["ui", "--data-dir", str(data_dir), "--port", str(self.port),
                                  "--simulator-port", str(self.sim_port), "--reset"]
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "CALL_PIPELINE_ALERT_WEBHOOK_URL": alert_url,
            "CALL_PIPELINE_ALERT_FORMAT": "json",
            "CALL_PIPELINE_UI_BASE_URL": self.base,
            # the sensors look every few seconds; a task is relaunched only when something changed
            "CALL_PIPELINE_SENSOR_TICK_SECONDS": "5",
            "CALL_PIPELINE_SENSOR_INTERVAL_SECONDS": "3600",
            "CALL_PIPELINE_SENSOR_MAX_INTERVAL_SECONDS": "86400",
            "CALL_PIPELINE_OP_MAX_RETRIES": "1",
            "CALL_PIPELINE_OP_RETRY_DELAY_SECONDS": "1",
            "CALL_PIPELINE_STATE_DIR": str(data_dir / "limits"),
        }
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.command, env=self.env, cwd=REPO_ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def gql(self, query: str, **variables: Any) -> dict:
        response = requests.post(f"{self.base}/graphql", json={"query": query, "variables": variables}, timeout=30)
        response.raise_for_status()
        payload = response.json()
        assert not payload.get("errors"), f"GraphQL errors: {payload['errors']}"
        return payload["data"]

    def wait_ready(self) -> str:
        """Waits until the webserver answers and the code location is loaded; returns its name."""

        def loaded() -> str | None:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"`call-pipeline ui` exited with {self.process.returncode}:\n{self.log_tail()}")
            entries = self.gql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                               "locationOrLoadError { __typename } } } } }")["workspaceOrError"]["locationEntries"]
            for entry in entries:
                if entry["loadStatus"] == "LOADED":
                    kind = entry["locationOrLoadError"]["__typename"]
                    assert kind == "RepositoryLocation", f"code location failed to load:\n{self.log_tail()}"
                    return entry["name"]
            return None

        return wait_until(loaded, UI_START_S, f"the Dagster UI on {self.base}")

    def processes(self) -> list[psutil.Process]:
        """The ui command and everything it started (they run in process groups of their own), and any
        process with this instance's DAGSTER_HOME (a run worker started after the others were listed)."""
        found: dict[int, psutil.Process] = {}
        if self.process is not None:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.process.pid)
                found[root.pid] = root
                found.update({child.pid: child for child in root.children(recursive=True)})
        home = str(self.home)
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("DAGSTER_HOME") == home:
                    found[proc.pid] = proc
        return [proc for proc in found.values() if _alive(proc)]

    def stop(self) -> list[str]:
        """SIGTERM, as a supervisor stops it; returns what is still alive afterwards (then killed)."""
        if self.process is None:
            return []
        started = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        _gone, alive = psutil.wait_procs(started, timeout=20)
        alive = [p for p in alive if _alive(p)]
        alive += [p for p in self.processes() if p not in alive]
        left = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                left.append(f"{proc.pid}: {' '.join(proc.cmdline())[:160]}")
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        for port in (self.port, self.sim_port):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                left.append(f"something still listens on port {port}")
        if self._log is not None:
            self._log.close()
        return left


# -- what the test reads from Dagster and the CRM (never to launch anything) --------------------

RUN_FIELDS = "runId status jobName parentRunId startTime endTime tags { key value }"


def _tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["tags"]}


def get_run(ui: UiServer, run_id: str) -> dict:
    return ui.gql(f"query($id: ID!) {{ runOrError(runId: $id) {{ ... on Run {{ {RUN_FIELDS} }} }} }}",
                  id=run_id)["runOrError"]


def sync_runs(ui: UiServer, statuses: list[str] | None = None) -> list[dict]:
    filter_: dict[str, Any] = {"pipelineName": JOB}
    if statuses:
        filter_["statuses"] = statuses
    query = f"query($f: RunsFilter) {{ runsOrError(filter: $f) {{ ... on Runs {{ results {{ {RUN_FIELDS} }} }} }} }}"
    return ui.gql(query, f=filter_)["runsOrError"]["results"]


def wait_for_run(ui: UiServer, run_id: str, status: str, timeout_s: float = RUN_S) -> dict:
    def done() -> dict | None:
        run = get_run(ui, run_id)
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") and run["status"] != status:
            pytest.fail(f"run {run_id} ended {run['status']}, expected {status}:\n{ui.log_tail()}")
        return run if run["status"] == status else None

    return wait_until(done, timeout_s, f"run {run_id} to reach {status}")


def wait_quiet(ui: UiServer, location: str, since: float, timeout_s: float = RUN_S) -> None:
    """Waits until no sync run is queued or running and call_task_sensor has looked again since the
    last one ended (and `since`) without requesting another: a run the sensor asks for meanwhile
    (the demo's calls move on) must not meet the fault of step 4."""
    selector = {"repositoryLocationName": location, "repositoryName": "__repository__",
                "sensorName": "call_task_sensor"}
    query = ("query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { sensorState "
             "{ ticks(limit: 1) { timestamp status } } } } }")

    def quiet() -> bool:
        if sync_runs(ui, ACTIVE_STATUSES):
            return False
        ended = max([since] + [run["endTime"] or 0 for run in sync_runs(ui)])
        ticks = ui.gql(query, s=selector)["sensorOrError"]["sensorState"]["ticks"]
        return bool(ticks) and ticks[0]["timestamp"] > ended and ticks[0]["status"] != "STARTED"

    wait_until(quiet, timeout_s, "the sync runs to finish and call_task_sensor to stay quiet")


def crm_tasks(data_dir: Path) -> dict[int, dict]:
    with contextlib.closing(sqlite3.connect(data_dir / "crm.sqlite3")) as conn:
        conn.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in conn.execute(
            "SELECT id, task_name, task_type, job_group_id FROM call_tasks ORDER BY id")}


def a_phone_of(data_dir: Path, task_id: int) -> str:
    with contextlib.closing(sqlite3.connect(data_dir / "crm.sqlite3")) as conn:
        for (phone,) in conn.execute("SELECT leads_phone FROM leads_task_list WHERE task_id = ? AND leads_phone "
                                     "IS NOT NULL ORDER BY id", (task_id,)):
            digits = re.sub(r"\D", "", phone)[-11:]
            if len(digits) == 11:
                return digits
    raise AssertionError(f"task {task_id} of the demo has no lead with an 11-digit phone")


# -- the browser --------------------------------------------------------------------------------


class Shots:
    """Screenshots, numbered in the order taken."""

    def __init__(self, page: Page) -> None:
        self.page, self.names = page, []

    def take(self, name: str) -> None:
        file = f"{len(self.names) + 1:02d}-{name}.png"
        # animations="disabled": a dialog or popover is shown as it ends, not half faded in
        self.page.screenshot(path=str(ARTIFACTS / file), animations="disabled")
        self.names.append(file)


def automation_row(page: Page, name: str):
    link = page.get_by_role("link", name=re.compile(rf"(^|\s){re.escape(name)}(\s|$)"))
    return page.locator("div").filter(has=link).filter(has=page.get_by_role("checkbox")).last


def test_operator_ui_in_a_real_browser(tmp_path: Path) -> None:
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: the browser test drives Debian's chromium; install it (and a CJK "
                    "font) with scripts/install-browser.sh")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), ARTIFACTS / "ui.log"]:
        old.unlink(missing_ok=True)

    inbox = AlertInbox()
    data_dir = tmp_path / "ui"
    ui = UiServer(data_dir, inbox.url, ARTIFACTS / "ui.log")
    started = time.monotonic()
    ui.start()
    left: list[str] = []
    try:
        location = ui.wait_ready()
        tasks = crm_tasks(data_dir)
        seeded_active = [t for t in tasks.values() if t["task_type"] in (2, 3) and t["job_group_id"]]
        assert len(seeded_active) >= 2, f"the demo should seed at least two tasks with a job group: {tasks}"
        # The sensor's first runs, one per active task, before anything is clicked.
        seeded_keys = {str(t["id"]) for t in seeded_active}
        wait_until(lambda: seeded_keys <= {_tags(r).get("dagster/partition") for r in sync_runs(ui, ["SUCCESS"])},
                   RUN_S, "call_task_sensor's first run of every task")
        wait_quiet(ui, location, since=0)
        tasks = crm_tasks(data_dir)
        still_active = [t for t in tasks.values() if t["task_type"] in (2, 3) and t["job_group_id"]]
        assert still_active, f"the demo should keep a task with calls still running: {tasks}"
        active = still_active[0]  # jobs still calling: its runs do real work
        done = next(t for t in seeded_active if t["id"] != active["id"])
        active_key, done_key = str(active["id"]), str(done["id"])

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=["--no-proxy-server"])
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            # Dagster's "Join the community" dialog, shown once on 127.0.0.1 (the handler is the fallback).
            context.add_init_script('window.localStorage.setItem("communityNux", JSON.stringify("1"));')
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                     lambda: page.get_by_role("button", name="Skip").click())
            shots = Shots(page)
            try:
                _walk_through(page, shots, ui, inbox, location, tasks, sorted(seeded_keys), active_key, done_key)
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(ARTIFACTS / "failure.png"))
                raise
            finally:
                context.close()
                browser.close()
    finally:
        left = ui.stop()
        inbox.close()
        print(f"\nbrowser test: {time.monotonic() - started:.0f}s; artifacts in {ARTIFACTS}")
    assert not left, "`call-pipeline ui` left processes or ports behind after SIGTERM:\n" + "\n".join(left)
    shutil.rmtree(data_dir, ignore_errors=True)


def _walk_through(page: Page, shots: Shots, ui: UiServer, inbox: AlertInbox, location: str,
                  tasks: dict[int, dict], synced_keys: list[str], active_key: str, done_key: str) -> None:
    base = ui.base
    active_name = tasks[int(active_key)]["task_name"]
    job_url = f"{base}/locations/{requests.utils.quote(location, safe='')}/jobs/{JOB}"

    # 1. Automation: the three sensors and the schedule are running (their toggles are on).
    page.goto(f"{base}/automation")
    for name in AUTOMATIONS:
        row = automation_row(page, name)
        expect(row).to_be_visible()
        expect(row.get_by_role("checkbox").last).to_be_checked()
    shots.take("automation-running")

    # 2. The tasks' names: the run tag every run carries, and the asset's per-partition history.
    page.get_by_role("link", name=re.compile(r"\bRuns$")).first.click()
    for key in synced_keys:
        expect(page.get_by_text(f"call_pipeline/task_name: {tasks[int(key)]['task_name']}").first).to_be_visible()
    shots.take("runs-task-names")
    page.goto(f"{base}/assets/{ASSET_PATH}?view=events&partition={done_key}")
    expect(page.get_by_text(f"{tasks[int(done_key)]['task_name']}: synced")).to_be_visible()
    shots.take("asset-event-task-name")

    # 3. A backfill of two tasks, clicked in the job's Partitions tab.
    page.goto(job_url)
    page.get_by_role("tab", name="Partitions").click()
    page.get_by_role("button", name=re.compile(r"Launch backfill")).click()
    dialog = page.get_by_role("dialog").filter(has_text=f"Launch {JOB} backfill")
    completed = dialog.get_by_role("checkbox", name=re.compile(r"^Completed"))
    if not completed.is_checked():  # the tasks have run: offer completed partitions too
        dialog.get_by_text(re.compile(r"^Completed \(")).click()
    expect(completed).to_be_checked()
    dialog.get_by_text("Select a partition or create one").click()
    for key in (done_key, active_key):
        page.get_by_role("menuitem", name=re.compile(rf"^{key}(\s|$)")).click()
    dialog.get_by_text(f"Launch {JOB} backfill").click()  # closes the partition list
    expect(page.get_by_placeholder("Filter partitions")).to_be_hidden()
    submit = dialog.get_by_role("button", name="Submit 2 runs")
    expect(submit).to_be_enabled()
    shots.take("backfill-dialog")
    backfill_clicked = time.time()
    submit.click()
    toast = page.get_by_text(re.compile(r"Created backfill \w+"))
    expect(toast).to_be_visible()
    backfill_id = re.search(r"Created backfill (\w+)", toast.inner_text()).group(1)

    def backfill_done() -> list[dict] | None:
        backfill = ui.gql("query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill "
                          f"{{ status partitionNames runs {{ {RUN_FIELDS} }} }} }} }}", id=backfill_id)
        backfill = backfill["partitionBackfillOrError"]
        assert sorted(backfill["partitionNames"]) == sorted([done_key, active_key]), backfill["partitionNames"]
        failed = [r["runId"] for r in backfill["runs"] if r["status"] in ("FAILURE", "CANCELED")]
        if failed or backfill["status"] in ("FAILED", "CANCELED", "COMPLETED_FAILED"):
            pytest.fail(f"backfill {backfill_id} did not succeed ({backfill['status']}, runs {failed}):\n"
                        + ui.log_tail())
        runs = backfill["runs"]
        if backfill["status"] == "COMPLETED_SUCCESS" and len(runs) == 2 and all(r["status"] == "SUCCESS" for r in runs):
            return runs
        return None

    backfill_runs = wait_until(backfill_done, RUN_S, f"backfill {backfill_id}'s two runs to succeed")
    by_partition = {_tags(run)["dagster/partition"]: run for run in backfill_runs}
    # every run carries its task's name, also the one for the task at 4 that has nothing to do
    for key, run in by_partition.items():
        assert _tags(run).get("call_pipeline/task_name") == tasks[int(key)]["task_name"], run
    page.goto(f"{base}/runs/b/{backfill_id}?tab=runs")
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()
    expect(page.get_by_text(f"call_pipeline/task_name: {active_name}").first).to_be_visible()
    shots.take("backfill-succeeded")

    # 4. The cloud breaks: ListJobsByGroup answers 500 for the active task's job group (with a phone
    # number in the message), and a run launched from the Launchpad fails for good. The group gets a
    # job late, so that the run must list its pages (a run whose leads hold every job lists none).
    wait_quiet(ui, location, since=backfill_clicked)
    phone = a_phone_of(ui.data_dir, int(active_key))
    group_id = tasks[int(active_key)]["job_group_id"]
    late = build_job_group(group_id, [], task_id=int(active_key), seed=424_242, orphan_jobs=1)["jobs"]
    requests.post(f"{ui.sim}/__sim/jobs", json={"job_group_id": group_id, "jobs": late},
                  timeout=10).raise_for_status()
    fault = {"action": "ListJobsByGroup", "status": 500, "times": None,
             "job_group_id": group_id,
             "message": f"backend exploded while paging the jobs of {phone[:3]} {phone[3:7]} {phone[7:]}"}
    requests.post(f"{ui.sim}/__sim/faults", json=fault, timeout=10).raise_for_status()

    page.goto(job_url)
    page.get_by_role("tab", name="Launchpad").click()
    expect(page.get_by_role("button", name=re.compile(r"Launch Run"))).to_be_visible()
    partition = page.get_by_placeholder("Partition")
    choice = page.get_by_role("menuitem", name=active_key, exact=True)
    for _attempt in range(6):  # the list opens empty when clicked before the partitions loaded
        partition.click()
        with contextlib.suppress(PlaywrightTimeoutError):
            choice.wait_for(state="visible", timeout=10_000)
            break
        page.keyboard.press("Escape")
    choice.click()
    expect(partition).to_have_value(active_key)
    expect(page.get_by_text(f"partition: {active_key}", exact=True).first).to_be_visible()
    # dagster.yaml and the job retry failed runs (max_retries 2): this run's failure must be final.
    page.get_by_role("button", name="Edit tags").click()
    tags_dialog = page.get_by_role("dialog").filter(has_text="Add tags to run")
    tags_dialog.get_by_role("button", name="Add custom tag").click()
    tags_dialog.get_by_placeholder("Tag Key").last.fill("dagster/max_retries")
    tags_dialog.get_by_placeholder("Tag Value").last.fill("0")
    shots.take("launchpad-no-retries")
    tags_dialog.get_by_role("button", name="Apply").click()
    expect(page.get_by_text("max_retries: 0", exact=True)).to_be_visible()
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    failed_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    failed = wait_for_run(ui, failed_id, "FAILURE")
    assert _tags(failed).get("dagster/max_retries") == "0", _tags(failed)
    expect(page.get_by_text("Failure", exact=True).first).to_be_visible()
    expect(page.get_by_text("list_job_pages").first).to_be_visible()
    shots.take("run-failed")

    def alert_of_run() -> dict | None:
        for body in inbox.bodies():
            alert = json.loads(body)
            if alert.get("run_id") == failed_id:
                return {"raw": body.decode(), **alert}
        return None

    alert = wait_until(alert_of_run, ALERT_S, f"the failure alert of run {failed_id} at the webhook")
    assert alert["task_id"] == active_key, alert
    assert alert["task_name"] == active_name, alert
    assert alert["run_url"] == f"{base}/runs/{failed_id}", alert
    assert alert["job"] == JOB and "list_job_pages" in alert["step"], alert
    assert "ListJobsByGroup" in alert["error"], alert
    assert f"{phone[:3]}****{phone[-4:]}" in alert["error"], alert  # the phone, masked
    without_ids = UUID.sub("<uuid>", alert["raw"])
    assert not re.search(r"\d{11}", without_ids), f"an 11-digit number in the alert: {alert['raw']}"
    assert phone not in re.sub(r"\D", "", without_ids), f"the lead's phone in the alert: {alert['raw']}"
    # final: the daemon decided not to retry, and no retry run came
    wait_until(lambda: _tags(get_run(ui, failed_id)).get("dagster/will_retry") == "false", ALERT_S,
               f"the daemon's decision not to retry {failed_id}")
    assert not [r for r in sync_runs(ui) if r["parentRunId"] == failed_id], "a retry of the failed run came"

    # 5. The fault cleared, a re-execution from failure clicked on the run page succeeds.
    requests.delete(f"{ui.sim}/__sim/faults", timeout=10).raise_for_status()
    reexecute = page.get_by_role("button", name=re.compile(r"Re-execute"))
    expect(reexecute).to_be_enabled()
    arrow = page.locator("div").filter(has=reexecute).filter(
        has=page.get_by_role("button", name="arrow_drop_down")).last.get_by_role("button", name="arrow_drop_down")
    arrow.click()
    from_failure = page.get_by_role("menuitem", name="From failure")
    expect(from_failure).to_be_enabled()
    shots.take("reexecute-from-failure")
    from_failure.click()
    page.wait_for_url(lambda url: re.search(r"/runs/[0-9a-f-]{36}", url) is not None and failed_id not in url)
    rerun_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    rerun = wait_for_run(ui, rerun_id, "SUCCESS")
    assert rerun["parentRunId"] == failed_id, rerun
    assert _tags(rerun).get("call_pipeline/task_name") == active_name, _tags(rerun)
    assert _tags(rerun).get("dagster/partition") == active_key, _tags(rerun)
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    shots.take("rerun-succeeded")

    # 6. The rerun's Markdown summary opens on its run page ...
    page.get_by_text("[Show Markdown]").last.click()
    summary = page.get_by_role("dialog").filter(has_text=f"Run summary for task {active_key}")
    expect(summary).to_be_visible()
    expect(summary.get_by_text("jobs listed")).to_be_visible()
    expect(summary.get_by_text("task state after")).to_be_visible()
    shots.take("run-summary")
    summary.get_by_role("button", name="Close").click()

    # ... and the task's history (its partition's materializations with numeric metadata, and the
    # plots) in the asset catalog.
    page.goto(f"{base}/assets/{ASSET_PATH}?view=partitions&partition={active_key}")
    expect(page.get_by_text("jobs_listed", exact=True)).to_be_visible()
    history = page.get_by_role("button", name=re.compile(r"View all historical events \(\d+\)"))
    expect(history).to_be_visible()
    count = int(re.search(r"\((\d+)\)", history.inner_text()).group(1))
    assert count >= 3, f"partition {active_key} should have a materialization per sync run: {count}"
    shots.take("asset-partition")
    history.click()
    events = page.get_by_role("dialog").filter(has_text=f"Historical events for {active_key}")
    expect(events).to_be_visible()
    for run_id in (rerun_id, by_partition[active_key]["runId"]):
        expect(events.get_by_role("link", name=run_id[:8], exact=True)).to_be_visible()
    shots.take("asset-task-history")
    # the rerun's materialization, opened: the task's name and the run's counts
    rerun_row = events.get_by_role("row").filter(has=page.get_by_role("link", name=rerun_id[:8], exact=True))
    rerun_row.get_by_role("button", name="arrow_drop_down").click()
    expect(events.get_by_text(f"{active_name}: synced")).to_be_visible()
    expect(events.get_by_text("jobs_listed", exact=True)).to_be_visible()
    shots.take("asset-task-history-counts")
    events.get_by_role("button", name="OK").click()
    expect(events).to_be_hidden()
    page.get_by_role("tab", name="Overview").click()
    page.get_by_role("button", name="Plots").click()
    expect(page.get_by_text("jobs_listed", exact=True).first).to_be_visible()
    shots.take("asset-plots-by-task")
    page.get_by_role("button", name=re.compile(r"(^|\s)Events$")).click()  # every run's counts, over time
    expect(page.get_by_text("jobs_listed", exact=True).first).to_be_visible()
    shots.take("asset-plots-over-time")
