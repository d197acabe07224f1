"""The pipeline's environment for a benchmark: the variables that point it at the simulator and
the CRM, a fresh Dagster home, and for --tasks > 1 the daemon's instance (its storage on MariaDB,
the run queue) and a RabbitMQ virtual host of the benchmark's own."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

import sqlalchemy as sa

from call_pipeline.crm.database import PROJECT_ROOT
from call_pipeline_tools.bench.cloud import SimulatorProcess
from call_pipeline_tools.bench.crm import MARIADB_SERVER_URL


def pipeline_environment(crm_url: str, simulator: SimulatorProcess, args: argparse.Namespace, workdir: str,
                 max_qps: float) -> None:
    from call_pipeline.clients.proxies import drop_proxy_variables

    drop_proxy_variables()
    os.environ.update({
        "CALL_PIPELINE_CRM_URL": crm_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "bench-access-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "bench-access-secret",
        "OUTBOUNDBOT_INSTANCE_ID": "bench-instance",
        "OUTBOUNDBOT_ENDPOINT": simulator.endpoint,
        "OUTBOUNDBOT_PROTOCOL": "http",
        "DASHSCOPE_API_KEY": "sk-bench",
        "DASHSCOPE_HTTP_BASE_URL": simulator.dashscope_base_url,
        "OUTBOUNDBOT_MAX_QPS": str(max_qps),
        "DASHSCOPE_MAX_CONCURRENCY": str(args.llm_concurrency),
        "CALL_PIPELINE_STATE_DIR": os.path.join(workdir, "limits"),
    })
    if not args.lasting_fault:
        # nothing should fail; if something does, the benchmark should say so, not back off for minutes
        os.environ.setdefault("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", "1")
    if args.archive:
        os.environ["CALL_PIPELINE_RECORDING_STORE"] = f"file://{os.path.join(workdir, 'recordings')}"
    for name, value in (("CALL_PIPELINE_EXECUTOR", args.executor),
                        ("CALL_PIPELINE_MAX_CONCURRENT_STEPS", args.max_concurrent),
                        ("CALL_PIPELINE_MAX_CONCURRENT_STEPS_PER_QUEUE", args.per_queue)):
        if value is not None:
            os.environ[name] = str(value)


def fresh_dagster_home(workdir: str) -> str:
    """A Dagster home configured like the project's (its dagster.yaml: pools, run limits)."""
    home = os.path.join(workdir, "dagster_home")
    os.makedirs(home)
    project_yaml = os.path.join(PROJECT_ROOT, "dagster.yaml")
    if os.path.exists(project_yaml):
        shutil.copy(project_yaml, os.path.join(home, "dagster.yaml"))
    extra = os.environ.get("CALL_PIPELINE_BENCH_EXTRA_YAML")  # an experiment's instance settings
    if extra:
        with open(os.path.join(home, "dagster.yaml"), "a", encoding="utf-8") as out, open(extra) as add:
            out.write("\n" + add.read())
    return home


@contextlib.contextmanager
def mysql_instance_env() -> Iterator[dict[str, str]]:
    """A utf8mb4 database of its own on the bench's MariaDB for the Dagster instance (the variables
    deploy/dagster.yaml reads), dropped afterwards."""
    server_url = sa.engine.make_url(MARIADB_SERVER_URL)
    name = f"call_pipeline_bench_dagster_{uuid.uuid4().hex[:10]}"
    server = sa.create_engine(MARIADB_SERVER_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
    try:
        yield {"DAGSTER_MYSQL_HOST": server_url.host or "127.0.0.1", "DAGSTER_MYSQL_PORT": str(server_url.port or 3306),
               "DAGSTER_MYSQL_USER": server_url.username or "root", "DAGSTER_MYSQL_PASSWORD": server_url.password or "",
               "DAGSTER_MYSQL_DB": name}
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        server.dispose()


MYSQL_STORAGE = {"mysql": {"mysql_db": {
    "hostname": {"env": "DAGSTER_MYSQL_HOST"}, "port": {"env": "DAGSTER_MYSQL_PORT"},
    "username": {"env": "DAGSTER_MYSQL_USER"}, "password": {"env": "DAGSTER_MYSQL_PASSWORD"},
    "db_name": {"env": "DAGSTER_MYSQL_DB"}}}}


def configure_run_queue(home: str, tasks: int, mysql: bool, dequeue_threads: int = 0) -> dict:
    """The bench's instance for the daemon: the project's dagster.yaml (already in `home`) with the
    queued run coordinator, a dequeue every second, room for every task's run at once (the limit
    of one run per partition stays: the tasks are distinct partitions) and, with `mysql`,
    deploy/dagster.yaml's storage. Returns what it wrote."""
    import yaml

    path = os.path.join(home, "dagster.yaml")
    config: dict = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    if mysql:
        deploy_yaml = os.path.join(PROJECT_ROOT, "deploy", "dagster.yaml")
        storage = MYSQL_STORAGE
        if os.path.exists(deploy_yaml):
            with open(deploy_yaml, encoding="utf-8") as handle:
                storage = (yaml.safe_load(handle) or {}).get("storage") or MYSQL_STORAGE
        config["storage"] = storage
    coordinator: dict = {"dequeue_interval_seconds": 1}
    if dequeue_threads > 0:
        coordinator.update(dequeue_use_threads=True, dequeue_num_workers=dequeue_threads)
    config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                                 "config": coordinator}
    runs = config.setdefault("concurrency", {}).setdefault("runs", {})
    runs["max_concurrent_runs"] = max(tasks, int(runs.get("max_concurrent_runs") or 0))
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False, allow_unicode=True)
    return config


def private_vhost() -> tuple[str, str] | None:
    """A RabbitMQ virtual host of the benchmark's own (its queues are nobody else's, and only its
    workers answer the ping), or None when rabbitmqctl is not at hand: (name, broker URL)."""
    import subprocess

    name = f"call_pipeline_bench_{uuid.uuid4().hex[:10]}"
    try:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        delete_vhost(name)
        return None
    return name, f"pyamqp://guest:guest@127.0.0.1:5672/{name}"


def delete_vhost(name: str) -> None:
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)


def daemon_environment(args: argparse.Namespace, home: str, stack: contextlib.ExitStack) -> dict:
    """--tasks > 1: the instance (its storage, a run queue with room for every task), the sensors'
    tick, the paging settings (sensor runs take no run config) and a RabbitMQ vhost of the
    benchmark's own for Celery. The clean-ups go on `stack`."""
    instance_kind = args.instance or ("mysql" if args.db == "mariadb" else "sqlite")
    if instance_kind == "mysql":
        os.environ.update(stack.enter_context(mysql_instance_env()))
    config = configure_run_queue(home, args.tasks, mysql=instance_kind == "mysql",
                                 dequeue_threads=args.dequeue_threads)
    os.environ["CALL_PIPELINE_SENSOR_TICK_SECONDS"] = str(args.sensor_tick)
    # a task whose run left work is relaunched at the next tick, not in 5 minutes
    os.environ.setdefault("CALL_PIPELINE_SENSOR_INTERVAL_SECONDS", str(max(10, 5 * args.sensor_tick)))
    for name, value in (("CALL_PIPELINE_PAGE_SIZE", args.page_size),
                        ("CALL_PIPELINE_PAGES_PER_BATCH", args.pages_per_batch)):
        if value:
            os.environ[name] = str(value)
    setup = {"instance": instance_kind, "max_concurrent_runs": config["concurrency"]["runs"]["max_concurrent_runs"],
             "sensor_tick_s": args.sensor_tick, "dequeue_threads": args.dequeue_threads, "celery_vhost": None}
    if (os.environ.get("CALL_PIPELINE_EXECUTOR") or "multiprocess") == "celery" and \
            not os.environ.get("CALL_PIPELINE_CELERY_BROKER"):
        vhost = private_vhost()
        if vhost is not None:
            stack.callback(delete_vhost, vhost[0])
            os.environ["CALL_PIPELINE_CELERY_BROKER"] = vhost[1]
            setup["celery_vhost"] = vhost[0]
    return setup
