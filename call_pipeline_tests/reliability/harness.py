"""Runs `sync_call_task` the way production does, so that a failed run can be re-executed from
failure: a reconstructable job whose resources come from environment variables (secrets through
`EnvVar`, as `call_pipeline.resources.resources_from_env` does), executed with `execute_job` on a
persistent instance (the filesystem IO manager keeps step outputs for re-execution).

`settle` is the operator: run the partition; while the run failed, re-execute it from failure;
once a run succeeds, launch plain runs of the partition (what the sensor does every interval)
until one changes nothing. After every run it checks the invariants that must hold at all times.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.forkserver
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from call_pipeline.clients.proxies import drop_proxy_variables
from call_pipeline.executors import sync_executor
from call_pipeline.jobs import sync_call_task
from call_pipeline.partitions import call_tasks_partitions
from call_pipeline.resources import (
    CrmDatabase,
    DashScopeResource,
    OutboundBotResource,
    RecordingArchiveResource,
    io_manager_from_settings,
)
from call_pipeline.settings import from_env
from call_pipeline_tests.pipeline_harness import TEST_ACCESS_KEY_SECRET, TEST_DASHSCOPE_KEY

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PAGE_SIZE = 20
TEST_ACCESS_KEY_ID = "test-ak-reliability"
SECRETS = (TEST_ACCESS_KEY_SECRET, TEST_DASHSCOPE_KEY)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def resources_for_tests() -> dict:
    """The pipeline's resources (contract: "Settings"), read from the environment like production
    (`from_env`: secrets as `EnvVar`s, every other setting its variable, e.g. the SDKs' backoff);
    the test-only knobs are the timeouts (RELIABILITY_READ_TIMEOUT_MS, RELIABILITY_LLM_TIMEOUT_S),
    and an unset endpoint is a closed port, never the cloud."""
    _read_step_env()
    return {
        "io_manager": io_manager_from_settings(),
        "crm": CrmDatabase(url=dg.EnvVar("CALL_PIPELINE_CRM_URL")),
        "recording_archive": RecordingArchiveResource(
            store_url=os.environ.get("CALL_PIPELINE_RECORDING_STORE") or None),
        "outboundbot": from_env(
            OutboundBotResource,
            endpoint=_env("OUTBOUNDBOT_ENDPOINT", "127.0.0.1:1"),
            protocol=_env("OUTBOUNDBOT_PROTOCOL", "http"),
            max_qps=float(_env("OUTBOUNDBOT_MAX_QPS", "1000")),
            read_timeout_ms=int(_env("RELIABILITY_READ_TIMEOUT_MS", "5000")),
        ),
        "dashscope": from_env(
            DashScopeResource,
            base_http_api_url=os.environ.get("DASHSCOPE_HTTP_BASE_URL") or None,
            max_concurrency=int(_env("DASHSCOPE_MAX_CONCURRENCY", "8")),
            request_timeout_s=float(_env("RELIABILITY_LLM_TIMEOUT_S", "10")),
        ),
    }


def reliability_sync_job() -> dg.JobDefinition:
    """`sync_call_task` with the resources above bound, on its own (default) executor (module
    scope: reconstructable)."""
    return dg.Definitions(jobs=[sync_call_task], resources=resources_for_tests()).resolve_job_def(
        sync_call_task.name)


def reliability_sync_job_in_process() -> dg.JobDefinition:
    """The same on the in-process executor: for the tests whose fault hooks live in this process
    (SQLAlchemy event listeners on the test's engine), which step processes would not see."""
    return reliability_sync_job().with_executor_def(sync_executor("in_process"))


def reliability_sync_job_multiprocess() -> dg.JobDefinition:
    return reliability_sync_job().with_executor_def(sync_executor("multiprocess"))


def reliability_sync_job_celery() -> dg.JobDefinition:
    return reliability_sync_job().with_executor_def(sync_executor("celery"))


_JOB_BY_EXECUTOR = {None: reliability_sync_job, "in_process": reliability_sync_job_in_process,
                    "multiprocess": reliability_sync_job_multiprocess, "celery": reliability_sync_job_celery}


# The executor of the clean runs and of the cloud-fault cases (test_outboundbot_faults.py,
# test_dashscope_faults.py): a fault meets the SDK's retries and the op's retry policy, and a
# re-execution from failure finishes the work, whichever executor runs the steps; in process is
# what production's run workers and the sensor's small runs use (README, "Executors"), and it
# starts no step process, so those cases cost far less CPU. What a process per step adds (a
# step process killed, the forkserver, steps side by side) keeps its cases on the default
# executor: test_process_kill.py, test_executors.py, test_concurrency.py, test_bad_input.py,
# test_security.py.
FAULT_RUNS_EXECUTOR = "in_process"


def reconstructable_job(executor: str | None = None):
    """Made on first use, not at import: building it loads Dagster's storage modules, whose
    global SQLAlchemy hook compiles every MySQL DateTime as DATETIME(6) — collecting this package
    would otherwise change the DDL of tests that run before any Dagster instance exists.
    `executor`: None for the job's own (the default executor)."""
    return dg.reconstructable(_JOB_BY_EXECUTOR[executor])


def pipeline_env_vars(crm_url: str, simulator, *, max_qps: float = 1000.0, max_concurrency: int = 8,
                      read_timeout_ms: int = 5000, llm_timeout_s: float = 10.0) -> dict[str, str]:
    return {
        "CALL_PIPELINE_CRM_URL": crm_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": TEST_ACCESS_KEY_SECRET,
        "OUTBOUNDBOT_INSTANCE_ID": "inst-reliability",
        "OUTBOUNDBOT_ENDPOINT": simulator.endpoint,
        "OUTBOUNDBOT_PROTOCOL": "http",
        "OUTBOUNDBOT_MAX_QPS": str(max_qps),
        "DASHSCOPE_API_KEY": TEST_DASHSCOPE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": simulator.dashscope_base_url,
        "DASHSCOPE_MAX_CONCURRENCY": str(max_concurrency),
        "RELIABILITY_READ_TIMEOUT_MS": str(read_timeout_ms),
        "RELIABILITY_LLM_TIMEOUT_S": str(llm_timeout_s),
    }


# The multiprocess executor forks its step processes from one forkserver per parent process,
# which keeps the environment it started with. A run process runs one run, so in production that
# is the run's environment; the tests run many runs in one process, each test with its own
# simulator (and port) and database. Starting a forkserver imports the project, pandas and the SDKs
# (seconds), so the variables that change from test to test (PIPELINE_ENV_NAMES) reach the step
# processes through a file instead (STEP_ENV_FILE, named by a variable the forkserver inherits and
# read by `resources_for_tests` in the step process), and the server is restarted only when any
# other variable differs from the environment it started with.
STEP_ENV_FILE = "CALL_PIPELINE_TEST_STEP_ENV_FILE"  # set by call_pipeline_tests/conftest.py
PIPELINE_ENV_NAMES = (
    "CALL_PIPELINE_CRM_URL", "ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    "OUTBOUNDBOT_INSTANCE_ID", "OUTBOUNDBOT_ENDPOINT", "OUTBOUNDBOT_PROTOCOL", "OUTBOUNDBOT_MAX_QPS",
    "DASHSCOPE_API_KEY", "DASHSCOPE_HTTP_BASE_URL", "DASHSCOPE_MAX_CONCURRENCY", "RELIABILITY_READ_TIMEOUT_MS",
    "RELIABILITY_LLM_TIMEOUT_S",
)


def _read_step_env() -> None:
    """In a step process (or worker) of this session's test process: the pipeline's variables as
    they were when the test launched the run. Not in the process that wrote them."""
    path = os.environ.get(STEP_ENV_FILE)
    if not path or not os.path.exists(path):
        return
    written = json.loads(Path(path).read_text(encoding="utf-8"))
    if written["pid"] == os.getpid():
        return
    for name, value in written["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _forkserver_environment() -> dict[str, str] | None:
    """The environment the running forkserver started with (Linux), or None when none runs.
    `_forkserver_pid` is private to multiprocessing; tests only."""
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(os.fsdecode(item).partition("=")[::2] for item in raw.split(b"\0") if item)


def prepare_step_processes() -> None:
    """Before a run in this process: hand the pipeline's variables to its step processes, and
    stop the forkserver if any other variable changed since it started (the next run starts a
    new one). `_stop` is private to multiprocessing; tests only."""
    path = os.environ.get(STEP_ENV_FILE)
    if path:
        temporary = f"{path}.{os.getpid()}.tmp"
        Path(temporary).write_text(json.dumps(
            {"pid": os.getpid(), "env": {name: os.environ.get(name) for name in PIPELINE_ENV_NAMES}}),
            encoding="utf-8")
        os.replace(temporary, path)  # a step process never reads half a file
    started_with = _forkserver_environment()
    if started_with is None:
        return
    passed_by_file = set(PIPELINE_ENV_NAMES) if path else set()
    if {k: v for k, v in started_with.items() if k not in passed_by_file} != \
            {k: v for k, v in os.environ.items() if k not in passed_by_file}:
        multiprocessing.forkserver._forkserver._stop()


@contextlib.contextmanager
def pipeline_env(crm_url: str, simulator, **knobs) -> Iterator[dict[str, str]]:
    """Sets the pipeline's environment variables for runs in this process, and restores them after."""
    values = pipeline_env_vars(crm_url, simulator, **knobs)
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Batches of two pages: the faults meet batches of several pages, and a scenario still has several
# batches (60 leads in pages of 20: pages 1-2 and page 3).
PAGES_PER_BATCH = 2


def run_config(page_size: int = DEFAULT_PAGE_SIZE) -> dict:
    return {"ops": {"list_job_pages": {"config": {"page_size": page_size, "pages_per_batch": PAGES_PER_BATCH}}}}


def partition_tags(task_id: int) -> dict[str, str]:
    return {"dagster/partition": str(task_id)}


def ensure_partition(instance: dg.DagsterInstance, task_id: int) -> None:
    if str(task_id) not in instance.get_dynamic_partitions(call_tasks_partitions.name):
        instance.add_dynamic_partitions(call_tasks_partitions.name, [str(task_id)])


def launch_run(instance: dg.DagsterInstance, task_id: int, *, page_size: int = DEFAULT_PAGE_SIZE,
               from_failure_of: str | None = None, executor: str | None = None,
               paging: dict | None = None, extra_config: dict | None = None) -> dg.JobExecutionResult:
    """One run of the partition, or a re-execution from failure of `from_failure_of` (tags are
    passed again: ReexecutionOptions.from_failure does not copy the parent's). `extra_config`: more
    run config (the sensor's `execution`)."""
    ensure_partition(instance, task_id)
    job = reconstructable_job(executor)
    # Dagster caches the reconstructed job (lru_cache); the resources must read this test's env.
    type(job).get_definition.cache_clear()
    type(job).get_repository_definition.cache_clear()
    prepare_step_processes()
    options = dg.ReexecutionOptions.from_failure(from_failure_of, instance) if from_failure_of else None
    config = {"ops": {"list_job_pages": {"config": paging}}} if paging else run_config(page_size)
    return dg.execute_job(job, instance, run_config={**config, **(extra_config or {})},
                          tags=partition_tags(task_id), raise_on_error=False, reexecution_options=options)


@dataclass
class Attempt:
    run_id: str
    kind: str  # "run" | "from_failure" | "relaunch"
    success: bool
    failed_steps: list[str] = field(default_factory=list)


@dataclass
class Settled:
    attempts: list[Attempt]

    @property
    def run_ids(self) -> list[str]:
        return [a.run_id for a in self.attempts]

    @property
    def failures(self) -> int:
        return sum(not a.success for a in self.attempts)


def settle(instance: dg.DagsterInstance, crm_url: str, task_id: int, *, page_size: int = DEFAULT_PAGE_SIZE,
           max_runs: int = 8, pause_s: float = 0.0, first_run_id: str | None = None,
           after_each: Callable[[Attempt], None] | None = None, first_kind: str = "run",
           executor: str | None = None) -> Settled:
    """Run the partition until it is done and steady: re-execute failed runs from failure, then
    relaunch (as the sensor does) until a successful run changes nothing. `first_run_id` starts
    from a run that already happened (e.g. one killed in a subprocess)."""
    from call_pipeline_tests.reliability.invariant import check_always, normalized

    attempts: list[Attempt] = []
    highest_task_type = [0]

    def record(result_or_run_id, kind: str) -> Attempt:
        if isinstance(result_or_run_id, str):
            run = instance.get_run_by_id(result_or_run_id)
            attempt = Attempt(result_or_run_id, kind, run.status == dg.DagsterRunStatus.SUCCESS)
        else:
            result = result_or_run_id
            attempt = Attempt(result.run_id, kind, result.success,
                              [] if result.success else list(result.get_failed_step_keys()))
        attempts.append(attempt)
        check_always(crm_url, task_id, highest_task_type)
        if after_each:
            after_each(attempt)
        return attempt

    last = record(first_run_id, first_kind) if first_run_id else record(
        launch_run(instance, task_id, page_size=page_size, executor=executor), "run")
    before = None
    while len(attempts) < max_runs:
        if not last.success:
            if pause_s:
                time.sleep(pause_s)
            last = record(launch_run(instance, task_id, page_size=page_size, from_failure_of=last.run_id,
                                     executor=executor), "from_failure")
            before = None
            continue
        current = normalized(crm_url, task_id)
        if before is not None and current == before:
            return Settled(attempts)
        before = current
        last = record(launch_run(instance, task_id, page_size=page_size, executor=executor), "relaunch")
    raise AssertionError(f"task {task_id} did not settle in {max_runs} runs: {attempts}")


# ---- messages of the Dagster event log ---------------------------------------------------------


def event_messages(instance: dg.DagsterInstance, run_ids) -> list[str]:
    """Every user-facing message of the runs' event logs: log lines, step failures with their
    error text, and metadata."""
    out: list[str] = []
    for run_id in run_ids:
        for entry in instance.all_logs(run_id):
            out.append(entry.user_message or "")
            event = entry.dagster_event
            if event is not None and event.is_step_failure and event.step_failure_data.error:
                out.append(event.step_failure_data.error.to_string())
            if event is not None and event.is_step_up_for_retry and event.step_retry_data.error:
                out.append(event.step_retry_data.error.to_string())
    return out


def serialized_event_log(instance: dg.DagsterInstance, run_ids) -> str:
    """The runs' event logs and run records, serialized in full: what a secret scan reads."""
    from dagster_shared.serdes import serialize_value

    parts = []
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        parts.append(json.dumps(run.run_config, default=str, ensure_ascii=False))
        parts.append(json.dumps(dict(run.tags), ensure_ascii=False))
        parts.append(serialize_value(run))
        for entry in instance.all_logs(run_id):
            parts.append(serialize_value(entry))
    return "\n".join(parts)


# ---- runs in a separate process ----------------------------------------------------------------


def subprocess_env(base: dict[str, str], dagster_home: Path, **extra: str) -> dict[str, str]:
    env = drop_proxy_variables(dict(os.environ))
    env.pop(STEP_ENV_FILE, None)  # its variables are `base`, in its environment
    env.update(base)
    env.update(DAGSTER_HOME=str(dagster_home), PYTHONPATH=str(PROJECT_ROOT), **extra)
    return env


def start_run_process(task_id: int, env: dict[str, str], log_path: Path, *,
                      page_size: int = DEFAULT_PAGE_SIZE, from_failure_of: str | None = None,
                      executor: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "call_pipeline_tests.reliability.run_partition", str(task_id),
            "--page-size", str(page_size)]
    if from_failure_of:
        args += ["--from-failure", from_failure_of]
    if executor:
        args += ["--executor", executor]
    handle = open(log_path, "wb")  # noqa: SIM115 - closed by the caller via finish_run_process
    # A session of its own: the run and its step processes can be killed together, as when the
    # machine or the container of a run worker dies.
    proc = subprocess.Popen(args, env=env, cwd=PROJECT_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc._log_handle = handle  # type: ignore[attr-defined]
    proc._log_path = log_path  # type: ignore[attr-defined]
    return proc


def step_processes(run_pid: int) -> list:
    """The multiprocess executor's step processes of a run process: the children of its
    forkserver (psutil.Process objects)."""
    import psutil

    steps = []
    for child in psutil.Process(run_pid).children():
        # a child that ends meanwhile (exited, not yet reaped: a zombie) is no forkserver
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if any("forkserver" in part for part in child.cmdline()):
                steps += child.children()
    return steps


def finish_run_process(proc: subprocess.Popen, timeout: float = 240) -> dict:
    """Wait for a run process; its last output line is a JSON report ({run_id, success})."""
    try:
        proc.wait(timeout=timeout)
    finally:
        proc._log_handle.close()  # type: ignore[attr-defined]
    output = Path(proc._log_path).read_text(errors="replace")  # type: ignore[attr-defined]
    for line in reversed(output.splitlines()):
        if line.startswith("{") and '"run_id"' in line:
            return {**json.loads(line), "returncode": proc.returncode, "output": output}
    return {"run_id": None, "success": False, "returncode": proc.returncode, "output": output}
