"""How many runs `call_task_sensor` asks for in an hour: `call-pipeline bench --sensor-hour`.

100 active tasks (`--tasks`), of which 10 (`--progressing`) see one more call finish every
5 minutes (`--every-minutes`); the others are quiet (their calls still running, the CRM holding no
work). The sensor is evaluated once per tick (CALL_PIPELINE_SENSOR_TICK_SECONDS) over a simulated
hour against the simulator, through the real SDK, on a CRM and a Dagster instance of its own.
Each run it asks for is recorded as a run that succeeded at once (what the sensor then compares
with), and run keys already used are dropped, as the daemon does. The clock is simulated: the
sensor's `time.time()` and the runs' end times follow it, so the hour takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from contextlib import ExitStack

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType

from call_pipeline import sensors
from call_pipeline.run_status import SYNC_JOB_NAME
from call_pipeline.settings import settings


class SimulatedClock:
    """Stands in for the `time` module inside sensors.py."""

    def __init__(self, start: float) -> None:
        self.now = start

    def time(self) -> float:
        return self.now


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="call-pipeline bench --sensor-hour", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sensor-hour", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--progressing", type=int, default=10)
    p.add_argument("--every-minutes", type=float, default=5.0, help="a progressing group's calls finish this often")
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--db", choices=("sqlite", "mariadb"), default="sqlite")
    return p


def _seed(crm_url: str, simulator, tasks: int, progressing: int, calls: int) -> dict[int, str]:
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import call_tasks, leads_task_list
    from call_pipeline_tools.simulator.scenarios import build_job_group

    engine = create_crm_engine(crm_url)
    groups: dict[int, str] = {}
    with engine.begin() as conn:
        for n in range(tasks):
            group_id = f"jg-sensor-{n}"
            task_id = int(conn.execute(call_tasks.insert().values(
                task_name=f"sensor task {n}", organization_id=1, task_type=2, job_group_id=group_id,
            )).inserted_primary_key[0])
            leads = [{"leads_id": 100 * n + i + 1, "leads_phone": f"139{n:04d}{i:04d}",
                      "reference_id": f"{task_id}1{100 * n + i + 1}"} for i in range(calls if n < progressing else 1)]
            conn.execute(leads_task_list.insert(), [{"task_id": task_id, "organization_id": 1, **lead}
                                                    for lead in leads])
            group = build_job_group(group_id, leads, task_id=task_id, seed=n, status_mix={"Succeeded": 1.0})
            for job in group["jobs"]:
                job["Status"] = "Executing"  # still calling: the CRM holds no work for the task
            simulator.state.add_job_group(group)
            groups[task_id] = group_id
    engine.dispose()
    return groups


def measure(args: argparse.Namespace) -> dict:
    from call_pipeline.definitions import defs
    from call_pipeline.resources import CrmDatabase, OutboundBotResource
    from call_pipeline_tools.bench.crm import crm_database
    from call_pipeline_tools.simulator.server import start_simulator

    # the definitions' resources name these; the sensor gets its own resources below
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "OUTBOUNDBOT_INSTANCE_ID",
                 "DASHSCOPE_API_KEY"):
        os.environ.setdefault(name, "bench")
    tick = settings().sensor_tick_seconds
    ticks = int(args.hours * 3600 // tick)
    every_ticks = max(1, int(args.every_minutes * 60 // tick))
    calls = ticks // every_ticks + 1
    with ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sensor-hour-"))
        crm_url = stack.enter_context(crm_database(args.db, workdir))
        os.environ["CALL_PIPELINE_CRM_URL"] = crm_url  # required, like the credentials above
        simulator = stack.enter_context(start_simulator())
        instance = stack.enter_context(dg.DagsterInstance.local_temp(
            tempdir=workdir, overrides={"telemetry": {"enabled": False}}))
        groups = _seed(crm_url, simulator, args.tasks, args.progressing, calls)
        resources = {"crm": CrmDatabase(url=crm_url), "outboundbot": OutboundBotResource(
            access_key_id="ak", access_key_secret="sk", instance_id="bench", endpoint=simulator.endpoint,
            protocol="http", max_qps=1000)}
        job = defs.resolve_job_def(SYNC_JOB_NAME)
        clock = SimulatedClock(time.time())
        stack.callback(setattr, sensors, "time", sensors.time)
        sensors.time = clock
        used: set[str] = set()
        runs: Counter[str] = Counter()
        list_job_groups_before = simulator.state.stats()["requests"].get("ListJobGroups", 0)
        evaluation_s = 0.0
        cursor = None
        sensor = sensors.make_call_task_sensor()
        for n in range(ticks + 1):
            if n and n % every_ticks == 0:
                for task_id in list(groups)[:args.progressing]:
                    still = [j for j in simulator.state.jobs_of_group(groups[task_id]) if j["Status"] == "Executing"]
                    if still:
                        simulator.state.set_job_status(still[0]["JobId"], "Succeeded")
            context = dg.build_sensor_context(instance_ref=instance.get_ref(), definitions=defs, resources=resources,
                                              cursor=cursor)
            started = time.perf_counter()
            result = sensor.evaluate_tick(context)
            evaluation_s += time.perf_counter() - started
            cursor = result.cursor or cursor  # as the daemon hands it to the next tick
            for request in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            for request in result.run_requests or []:
                if request.run_key in used:
                    continue
                used.add(request.run_key)
                runs[request.run_key.split("-")[2]] += 1
                run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED,
                                                  tags={"dagster/partition": request.partition_key, **request.tags})
                instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=job.name),
                                              run_id=run.run_id, timestamp=clock.now)
            clock.now += tick
        calls_made = simulator.state.stats()["requests"].get("ListJobGroups", 0) - list_job_groups_before
    interval_runs = args.tasks * int(args.hours * 3600 // settings().sensor_interval_seconds)
    return {"ticks": ticks + 1, "runs": sum(runs.values()), "by_reason": dict(runs),
            "list_job_groups_calls": calls_made, "tick_ms": 1000 * evaluation_s / (ticks + 1),
            "before": interval_runs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = measure(args)
    hours = args.hours
    print(f"{args.tasks} active tasks, {args.progressing} of them with a call finishing every "
          f"{args.every_minutes:g} min, {hours:g} simulated hour(s), a tick every {settings().sensor_tick_seconds} s")
    print(f"  runs asked for: {figures['runs']} ({figures['runs'] / hours:.0f} per hour), by reason "
          f"{figures['by_reason']}")
    print(f"  ListJobGroups calls: {figures['list_job_groups_calls']} for {figures['ticks']} ticks; "
          f"one tick took {figures['tick_ms']:.0f} ms")
    print(f"  a run per task per CALL_PIPELINE_SENSOR_INTERVAL_SECONDS ({settings().sensor_interval_seconds} s) "
          f"would be {figures['before']} ({figures['before'] / hours:.0f} per hour)")
    return 0
