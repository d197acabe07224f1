"""`call-pipeline serve`: everything the sensors, the schedule and the runs need on one machine,
started and stopped as one.

What it starts, from the instance it runs with (`$DAGSTER_HOME/dagster.yaml`; with `DAGSTER_HOME`
unset, a home folder under the current one holding the packaged copy of the project's
`dagster.yaml`):
- `dagster code-server start`: the code location, loaded once, that the daemon and the webserver
  share (started on their own, each would spawn a code server of its own, and the daemon replaces
  its code server with a new process, which imports the project again, every minute: about 3 s of
  CPU a minute on a machine that only watches);
- `dagster-daemon run` (sensors, schedule, run queue, run retries and monitoring), as
  `call_pipeline.daemon` starts it;
- `dagster-webserver`, unless `--no-ui`;
- a Celery worker on the step queues when `CALL_PIPELINE_EXECUTOR=celery`;
- a Celery worker on the launcher's queue when the instance's `run_launcher` is dagster-celery's
  `CeleryRunLauncher` (runs are Celery tasks there, and nothing else would take them).

Each process starts in a session (and process group) of its own, so that a terminal's Ctrl-C
reaches `serve` alone and `serve` stops each whole group: the code servers the daemon and the
webserver start, the run processes those start, the forkservers of the runs' step processes, the
Celery pool processes. SIGTERM, SIGINT or SIGHUP stops them all: SIGTERM to each group (Dagster's
processes take it as an interrupt, Celery's worker as a warm shutdown), a wait, then SIGKILL to
whatever is left, found through the process groups and the process tree with psutil. When one of
the processes ends on its own, the others are stopped too and `serve` exits non-zero: a half
machine (a daemon without webserver, runs without their worker) is not left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psutil
import yaml

from call_pipeline.queues import STEP_QUEUES

# The code location: a module of the installed package, not a path into a checkout. Its name is
# the one Dagster gives that module (`dagster dev`, workspace.yaml): the sensors' and the schedule's
# state (cursors, on or off) is kept under it.
WORKSPACE_ARGS = ("-m", "call_pipeline.definitions", "-a", "defs")
CODE_LOCATION = "call_pipeline.definitions:defs"
CELERY_RUN_LAUNCHER = "CeleryRunLauncher"
# The run workers' threads (in all) when the instance does not bound the runs it hands over.
DEFAULT_RUN_SLOTS = 8
STOP_TIMEOUT_S = 20.0
POLL_S = 0.5


class ServeError(RuntimeError):
    """`serve` cannot start: what is wrong with its instance or settings, said plainly."""


@dataclass(frozen=True)
class Service:
    """One process `serve` starts and watches. With `port`, the next service starts only once
    something listens on it (the simulator, before the sensors ask it anything)."""

    name: str
    command: tuple[str, ...]
    port: int | None = None


def log(message: str) -> None:
    print(f"call-pipeline serve: {message}", file=sys.stderr, flush=True)


def packaged_instance_yaml() -> str:
    """The project's own one-machine `dagster.yaml`, as shipped in the package."""
    return resources.files("call_pipeline").joinpath("dagster.yaml").read_text(encoding="utf-8")


def install_instance_yaml(home: Path) -> Path:
    """Make `home` a Dagster home holding the project's `dagster.yaml` (replaced each time: the
    folder is serve's own, and its instance file follows the installed package)."""
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    target.write_text(packaged_instance_yaml(), encoding="utf-8")
    return target


def resolve_home(env: Mapping[str, str], data_dir: Path) -> tuple[Path, bool]:
    """The Dagster home to run with, and whether serve made it: `$DAGSTER_HOME` when set (it must
    hold a dagster.yaml), else `data_dir/dagster_home` with the packaged dagster.yaml."""
    configured = env.get("DAGSTER_HOME")
    if configured:
        home = Path(configured)
        if not (home / "dagster.yaml").is_file():
            raise ServeError(f"DAGSTER_HOME={configured} has no dagster.yaml: put the instance's settings there "
                             "(deploy/dagster.yaml for several machines), or unset DAGSTER_HOME to run with the "
                             "project's own")
        return home.resolve(), False
    home = (data_dir / "dagster_home").resolve()
    install_instance_yaml(home)
    return home, True


def read_instance_config(home: Path) -> dict[str, Any]:
    path = home / "dagster.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ServeError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ServeError(f"{path} is not a mapping of instance settings")
    return config


def open_instance_storage(home: Path) -> None:
    """Opens the instance once before its processes start: a new instance's storage (SQLite files,
    or MySQL tables) and its pools are created here, not by the daemon, the webserver and the first
    runs at the same moment (their schema migrations race, and one of them dies; so do the first
    claims of a pool)."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    from call_pipeline.instance import create_pools

    try:
        with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
            create_pools(instance)
    except Exception as exc:
        raise ServeError(f"cannot open the Dagster instance of {home / 'dagster.yaml'}: {exc}") from exc


def _string_source(value: Any, env: Mapping[str, str], what: str) -> str:
    """A Dagster StringSource: a string, or `{env: NAME}` read from the environment."""
    if isinstance(value, dict) and set(value) == {"env"}:
        name = value["env"]
        if not env.get(name):
            raise ServeError(f"{what} is read from the environment variable {name}, which is not set")
        return env[name]
    if not isinstance(value, str) or not value:
        raise ServeError(f"{what} must be a queue name, got {value!r}")
    return value


def _is_celery_run_launcher(launcher: Mapping[str, Any]) -> bool:
    """dagster-celery's `CeleryRunLauncher` or a subclass of it (the production instance's)."""
    import importlib

    from dagster_celery.launcher import CeleryRunLauncher

    try:
        cls = getattr(importlib.import_module(str(launcher.get("module"))), str(launcher.get("class")))
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, CeleryRunLauncher)


def celery_run_queue(config: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """The queue runs go to when the instance's run launcher is dagster-celery's
    `CeleryRunLauncher` (its required `default_queue`); None for any other launcher."""
    launcher = config.get("run_launcher")
    if not isinstance(launcher, dict) or not _is_celery_run_launcher(launcher):
        return None
    queue = (launcher.get("config") or {}).get("default_queue")
    return _string_source(queue, env, f"run_launcher.config.default_queue ({CELERY_RUN_LAUNCHER})")


def run_slots(config: Mapping[str, Any]) -> int | None:
    """How many runs the instance hands to its run workers at once (`concurrency.runs.
    max_concurrent_runs`); None when unbounded (Dagster's default)."""
    runs = ((config.get("concurrency") or {}).get("runs") or {})
    limit = runs.get("max_concurrent_runs")
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def write_workspace(path: Path, code_port: int) -> Path:
    """A workspace file naming the code server of `serve` (on `code_port`) as the code location."""
    path.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
        "host": "127.0.0.1", "port": code_port, "location_name": CODE_LOCATION}}]}), encoding="utf-8")
    return path


def plan_services(config: Mapping[str, Any], env: Mapping[str, str], *, ui: bool, host: str, port: int,
                  code_port: int, workspace: Path, python: str = sys.executable,
                  cpus: int | None = None) -> list[Service]:
    """What one machine (of `cpus` CPUs, the machine's own by default) runs for the instance
    `config` and the settings in `env`; `workspace` (`write_workspace`) names the code server,
    which listens on `code_port`."""
    from call_pipeline.settings import PipelineSettings, from_env

    services: list[Service] = []
    worker = (python, "-m", "call_pipeline.cli", "worker")
    # Celery names a worker `celery@host` unless told: two on one machine would share the name.
    if from_env(PipelineSettings, env, secrets_as_env_vars=False).executor == "celery":
        services.append(Service("step worker", (*worker, "--queues", ",".join(STEP_QUEUES), "--name", "steps@%h")))
    run_queue = celery_run_queue(config, env)
    if run_queue is not None:
        # Runs side by side on threads, as many in all as the instance hands over at once (a
        # burst of new tasks all start within seconds), in one worker per CPU: each process's runs
        # share its interpreter lock (README, "Runs on Celery workers", says what was measured).
        count = max(1, cpus or os.cpu_count() or 1)
        threads = str(-(-(run_slots(config) or DEFAULT_RUN_SLOTS) // count))
        for i in range(1, count + 1):
            services.append(Service("run worker" if count == 1 else f"run worker {i}", (
                *worker, "--queues", run_queue, "--pool", "threads", "--concurrency", threads,
                "--name", f"runs{'' if count == 1 else i}@%h")))
    # With the UI, Dagster's reloadable proxy: the UI's "Reload" loads changed code. Without a UI
    # nothing can ask for a reload, and the proxy would cost its keep for nothing: it pings the
    # server it runs every second (about 0.9 s of CPU a minute on a machine that only watches, README).
    server = ("code-server", "start") if ui else ("api", "grpc")
    services.append(Service("code server", (python, "-m", "dagster", *server, *WORKSPACE_ARGS,
                                             "--location-name", CODE_LOCATION, "-h", "127.0.0.1",
                                             "-p", str(code_port), "--log-level", "warning"), port=code_port))
    services.append(Service("dagster-daemon", (python, "-m", "call_pipeline.daemon", "run", "-w", str(workspace))))
    if ui:
        services.append(Service("dagster-webserver", (python, "-m", "dagster_webserver", "-w", str(workspace),
                                                      "-h", host, "-p", str(port))))
    return services


class _StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup(parent: int) -> Callable[[], None]:
    """Runs in each child between fork and exec."""

    def setup() -> None:
        # A shell that starts serve in the background has SIGINT ignored, and a child would inherit
        # that (Python then installs no KeyboardInterrupt): each child gets the default back.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # serve killed outright (SIGKILL, the OOM killer) cannot stop its children: the kernel
        # sends them SIGTERM then (Linux), so that they stop their own processes as on a stop.
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # serve died before the line above
                os._exit(1)

    return setup


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's zombie waits for an init that may never reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_members(groups: set[int]) -> Iterator[psutil.Process]:
    """Every live process in one of the process groups `groups`, wherever it sits in the tree (a
    forkserver whose run ended is an orphan, but keeps its group)."""
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) in groups and _alive(proc):
                yield proc


class Supervisor:
    """Starts `services` in order, watches them, and stops every process they started."""

    def __init__(self, services: Sequence[Service], env: Mapping[str, str], cwd: Path | None = None,
                 stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.services = list(services)
        self.env = dict(env)
        self.cwd = cwd
        self.stop_timeout_s = stop_timeout_s
        self.started: list[tuple[Service, subprocess.Popen]] = []
        self._signal: int | None = None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only noted here, and acted on between steps: raising from the handler could come between
        # starting a process and recording it, and that process would then never be stopped.
        if self._signal is None:
            self._signal = signum
        else:  # a second Ctrl-C: no more waiting
            self.stop_timeout_s = 0.0

    def _check_signal(self) -> None:
        if self._signal is not None:
            raise _StopRequested(self._signal)

    def run(self) -> int:
        """Runs until a signal (exit 0) or until a process ends on its own (exit 1)."""
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_signal)}
        # SIGINT and SIGHUP (its terminal closed) stop it too, unless its starter chose to ignore
        # them (`&`, nohup)
        for signum in (signal.SIGINT, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            for service in self.services:
                self._check_signal()
                self._start(service)
            log("started " + ", ".join(f"{s.name} (pid {p.pid})" for s, p in self.started)
                + "; SIGTERM or Ctrl-C stops them all")
            while True:
                self._check_signal()
                for service, process in self.started:
                    code = process.poll()
                    if code is not None:
                        log(f"{service.name} (pid {process.pid}) exited with code {code}; stopping the others")
                        return 1
                time.sleep(POLL_S)
        except _StopRequested as stop:
            log(f"{signal.Signals(stop.signum).name} received; stopping "
                + ", ".join(service.name for service, _process in self.started) + " and what they started")
            return 0
        except ServeError as exc:
            log(f"error: {exc}; stopping the others")
            return 1
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _start(self, service: Service) -> None:
        process = subprocess.Popen(list(service.command), env=self.env, cwd=self.cwd, start_new_session=True,
                                   preexec_fn=_child_setup(os.getpid()))
        self.started.append((service, process))
        if service.port is not None:
            self._wait_for_port(service, process)

    def _wait_for_port(self, service: Service, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_signal()
            if process.poll() is not None:
                raise ServeError(f"{service.name} exited with code {process.returncode} before it listened "
                                 f"on port {service.port}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", service.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise ServeError(f"{service.name} did not listen on port {service.port} within {timeout_s:.0f}s")
            time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        """Every live process started, directly or not, by the services."""
        found: dict[int, psutil.Process] = {}
        for _service, process in self.started:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(process.pid)
                found[root.pid] = root
                found.update({child.pid: child for child in root.children(recursive=True)})
        found.update({proc.pid: proc for proc in _group_members({p.pid for _s, p in self.started})})
        return [proc for proc in found.values() if _alive(proc)]

    def stop(self) -> None:
        """SIGTERM to each service's process group (and to any descendant that left it), a wait of
        up to `stop_timeout_s` for all of them, then SIGKILL to what is left."""
        groups = {process.pid for _service, process in self.started}
        if not groups:
            return
        # the tree as it is now: a process whose parent ends first is still found, in or out of its group
        tree = self.processes()
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        for proc in tree:
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(proc.pid) not in groups:
                    proc.terminate()
        began = time.monotonic()
        while True:
            for _service, process in self.started:
                process.poll()  # reap the direct children as they end
            left = list({proc.pid: proc for proc in [*tree, *self.processes()] if _alive(proc)}.values())
            # (re-read each time: a second Ctrl-C sets the timeout to 0)
            if not left or time.monotonic() - began >= self.stop_timeout_s:
                break
            time.sleep(POLL_S)  # each look reads the whole process table
        if not left:
            log(f"every process stopped, {time.monotonic() - began:.1f}s after SIGTERM")
        else:
            log(f"still running {time.monotonic() - began:.0f}s after SIGTERM, killed: "
                + "; ".join(_describe(proc) for proc in left))
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(left, timeout=5)
        for _service, process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


def _describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{proc.pid} ({' '.join(proc.cmdline())[:120]})"
    return str(proc.pid)


def serve_environment(env: Mapping[str, str], data_dir: Path) -> tuple[dict[str, str], Path]:
    """The environment the services run with (DAGSTER_HOME set), and the home it names."""
    home, made = resolve_home(env, data_dir)
    if made:
        log(f"DAGSTER_HOME is not set: running with the project's dagster.yaml in {home}")
    return {**env, "DAGSTER_HOME": str(home)}, home


def serve(*, ui: bool, host: str, port: int, data_dir: Path, env: Mapping[str, str] | None = None,
          before: Sequence[Service] = ()) -> int:
    """Plans and runs the services of one machine (after `before`: the demo's simulator)."""
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="call_pipeline_serve_") as own:
        try:
            env, home = serve_environment(env, data_dir)
            open_instance_storage(home)
            code_port = free_port()
            workspace = write_workspace(Path(own) / "workspace.yaml", code_port)
            services = [*before, *plan_services(read_instance_config(home), env, ui=ui, host=host, port=port,
                                                code_port=code_port, workspace=workspace)]
        except (ServeError, ValueError) as exc:
            log(f"error: {exc}")
            return 2
        if ui:
            log(f"Dagster UI on http://{host}:{port}")
        return Supervisor(services, env).run()


def free_port() -> int:
    """A port free on this machine now (the code server's: nothing outside serve connects to it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
