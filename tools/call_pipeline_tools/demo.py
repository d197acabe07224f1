"""The one-command demo: a SQLite CRM with a few call tasks covering every matching and follow-up
case of docs/contract.md, the simulator standing in for the cloud, the sensor deciding which tasks
to run, and `sync_call_task` run for each of them end to end. Prints a table per round, and below
it the runs' warnings by task and lead."""

from __future__ import annotations

import os
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from call_pipeline.clients.proxies import drop_proxy_variables
from call_pipeline.crm import repository
from call_pipeline.crm.database import DEFAULT_DATA_DIR, create_crm_engine, create_crm_tables
from call_pipeline.crm.schema import call_tasks, leads_task_list
from call_pipeline.run_status import SYNC_JOB_NAME

DEMO_DIR = DEFAULT_DATA_DIR / "demo"
DEMO_CRM_URL = f"sqlite:///{DEMO_DIR / 'crm.sqlite3'}"
DEMO_ORGANIZATION = 88


@dataclass
class DemoTask:
    name: str
    leads: int
    task_type: int = 2
    job_group_id: str | None = None
    # leads without a stored reference_id (an old task): matched by legacy reference or phone
    legacy: bool = False
    build: dict = field(default_factory=dict)


DEMO_TASKS = [
    DemoTask("新车上市邀约（新任务，按 reference_id 匹配）", 240, job_group_id="jg-demo-new",
             build={"status_mix": {"Succeeded": 0.6, "Failed": 0.3, "Cancelled": 0.1}}),
    DemoTask("老客户回访（历史任务：旧格式引用与电话匹配，重复号码，未匹配线索）", 150, legacy=True,
             job_group_id="jg-demo-legacy",
             build={"status_mix": {"Succeeded": 0.55, "Failed": 0.35, "Cancelled": 0.1},
                    "legacy_reference_fraction": 0.5}),
    DemoTask("周末试驾邀约（部分线索仍在外呼中）", 120, job_group_id="jg-demo-running",
             build={"status_mix": {"Succeeded": 0.5, "Failed": 0.2, "Executing": 0.15, "Scheduling": 0.15}}),
    DemoTask("草稿任务（尚未开始外呼，不应处理）", 20, task_type=1, job_group_id=None),
    DemoTask("缺少 job_group_id 的任务（不应处理）", 10, task_type=2, job_group_id=None),
]


def _phone(rng: random.Random) -> str:
    return f"1{rng.choice('3578')}{rng.randint(0, 999_999_999):09d}"


def seed_demo_crm(url: str = DEMO_CRM_URL, *, seed: int = 7) -> dict[int, DemoTask]:
    """Create the demo CRM from scratch: the tasks above and their leads, with the edge cases:
    phones written with spaces, dashes and +86, duplicate phones, leads with neither phone nor
    reference id."""
    rng = random.Random(seed)
    engine = create_crm_engine(url)
    create_crm_tables(engine, replace=True)
    now = datetime.now().replace(microsecond=0)
    tasks: dict[int, DemoTask] = {}
    with engine.begin() as conn:
        for spec in DEMO_TASKS:
            task_id = conn.execute(call_tasks.insert().values(
                task_name=spec.name, organization_id=DEMO_ORGANIZATION, task_type=spec.task_type,
                job_group_id=spec.job_group_id, created_time=now, updated_time=now)).inserted_primary_key[0]
            tasks[int(task_id)] = spec
            rows = []
            for n in range(spec.leads):
                leads_id = 10_000 * int(task_id) + n + 1
                phone = _phone(rng)
                style = n % 5
                if style == 1:
                    phone = f"{phone[:3]} {phone[3:7]} {phone[7:]}"
                elif style == 2:
                    phone = f"+86-{phone[:3]}-{phone[3:7]}-{phone[7:]}"
                rows.append({
                    "task_id": task_id, "leads_id": leads_id, "organization_id": DEMO_ORGANIZATION,
                    "leads_phone": phone,
                    "reference_id": None if spec.legacy else f"{task_id}{DEMO_ORGANIZATION}{leads_id}",
                })
            if spec.legacy and len(rows) > 6:
                # two customers sharing one number (a family phone): paired one to one, never both
                rows[5]["leads_phone"] = rows[4]["leads_phone"].replace(" ", "")
                # a lead with neither phone nor reference id: nothing to match, never marked Failed
                rows[6]["leads_phone"] = None
            conn.execute(leads_task_list.insert(), rows)
    engine.dispose()
    return tasks


def demo_special_cases(task_id: int, spec: DemoTask) -> dict[int, list[str]]:
    """Edge cases (matching, follow-ups, bad input) placed on particular leads of a demo task."""
    first = 10_000 * task_id + 1
    if spec.legacy:
        return {
            first + 4: ["no_reference", "phone:plus86_dashed"],
            first + 5: ["no_reference", "phone:0086"],
            first + 6: ["skip"],
            first + 7: ["skip"],
            first + 8: ["skip"],
            first + 9: ["no_tasks", "status:Failed"],
            first + 10: ["conversation_string"],
            first + 11: ["times_in_seconds"],
        }
    if spec.job_group_id == "jg-demo-new":
        return {
            first: ["llm:garbage"],
            first + 1: ["llm:fenced"],
            first + 2: ["llm:out_of_range"],
            first + 3: ["llm:string_one"],
            first + 4: ["injection"],
            first + 5: ["conversation_empty"],
            first + 6: ["planed_time_zero"],
        }
    return {}


def prepare_environment(crm_url: str, simulator_handle, data_dir: Path) -> None:
    """Point the pipeline's settings at the demo CRM, its folder and the local simulator (before
    the definitions load and read them)."""
    os.environ.update({
        "CALL_PIPELINE_CRM_URL": crm_url,
        "CALL_PIPELINE_STATE_DIR": str(data_dir / "limits"),
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "demo-access-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "demo-access-secret",
        "OUTBOUNDBOT_INSTANCE_ID": "demo-instance",
        "OUTBOUNDBOT_ENDPOINT": simulator_handle.endpoint,
        "OUTBOUNDBOT_PROTOCOL": "http",
        "DASHSCOPE_API_KEY": "sk-demo",
        "DASHSCOPE_HTTP_BASE_URL": simulator_handle.dashscope_base_url,
    })
    # Nothing here should fail; if something does, the demo should say so quickly, not back off.
    os.environ.setdefault("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", "1")
    os.environ.setdefault("CALL_PIPELINE_OP_MAX_RETRIES", "1")
    drop_proxy_variables()


def demo_job_groups(crm_url: str, tasks: dict[int, DemoTask]) -> list[dict]:
    """The simulated cloud's job groups for the demo tasks, built from their leads in the CRM."""
    from call_pipeline_tools.simulator.scenarios import build_job_group_from_crm

    return [
        build_job_group_from_crm(crm_url, task_id, seed=task_id, special_cases=demo_special_cases(task_id, spec),
                                 **spec.build)
        for task_id, spec in tasks.items()
        if spec.job_group_id and spec.task_type == 2
    ]


def load_job_groups(simulator_handle, crm_url: str, tasks: dict[int, DemoTask]) -> None:
    for group in demo_job_groups(crm_url, tasks):
        simulator_handle.state.add_job_group(group)


def task_table(crm_url: str) -> list[dict]:
    """One row per task: what the pipeline wrote to the CRM."""
    engine = create_crm_engine(crm_url)
    with engine.connect() as conn:
        rows = repository.task_progress(conn)
    engine.dispose()
    return rows


COLUMNS = [("id", "task"), ("leads", "leads"), ("matched", "matched"), ("unmatched", "unmatched→Failed"),
           ("untouched", "no job, untouched"),
           ("succeeded", "Succeeded"), ("failed", "Failed"), ("cancelled", "Cancelled"),
           ("running", "in progress"), ("recordings", "recordings"), ("follow_ups", "follow-ups"),
           ("interested", "int.=1"), ("not_interested", "int.=2"), ("cannot_tell", "int.=0"),
           ("task_type", "task_type")]


def format_table(rows: list[dict]) -> str:
    headers = [title for _, title in COLUMNS]
    body = [[str(row[key]) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    names = [f"  task {row['id']}: {row['task_name']}" for row in rows]
    return "\n".join(lines + [""] + names)


_JOB_ID = re.compile(r"\bjob ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")
_TASK_PREFIX = re.compile(r"^task \d+(?: pages [\d-]+)?:? ?")
# what is left of a line that names several jobs (steps/call_results.named_jobs) once they are taken out
_JOB_LIST_LEFT = re.compile(r"[:,\s]*(?:and (\d+) more job\(s\))?\s*$")


def describe_warnings(messages: list[str], lead_of_job: dict[str, int], limit: int = 8) -> list[str]:
    """A run's warnings, for people: each job named by its lead, the same warning of several leads
    on one line, most frequent first."""
    leads_by_text: dict[str, list[str]] = {}
    unnamed: Counter = Counter()  # leads of the jobs a line counted without naming them
    for message in messages:
        leads = [str(lead_of_job.get(job, f"of job {job[:8]}")) for job in _JOB_ID.findall(message)]
        rest = _JOB_ID.sub("", message)
        more = _JOB_LIST_LEFT.search(rest)
        text = _TASK_PREFIX.sub("", _JOB_LIST_LEFT.sub("", rest)).strip(" :")
        leads_by_text.setdefault(text, []).extend(leads or [""])
        if more and more.group(1):
            unnamed[text] += int(more.group(1))
    lines = []
    for text, leads in sorted(leads_by_text.items(), key=lambda item: -(len(item[1]) + unnamed[item[0]])):
        named = [lead for lead in leads if lead]
        if not named:
            lines.append(text)
            continue
        total = len(named) + unnamed[text]
        shown = ", ".join(named[:limit]) + (f" and {total - min(limit, len(named))} more"
                                            if total > min(limit, len(named)) else "")
        lines.append(f"{'lead' if total == 1 else f'{total} leads'} {shown}: {text}")
    return lines


def run_warnings(instance, run_id: str) -> list[str]:
    """What the run logged at WARNING and above (the console shows only errors in the demo)."""
    import logging

    return [entry.user_message for entry in instance.all_logs(run_id)
            if not entry.is_dagster_event and entry.level >= logging.WARNING]


def format_warnings(crm_url: str, warnings_by_task: dict[int, list[str]], names: dict[int, str]) -> str:
    if not any(warnings_by_task.values()):
        return "No warnings."
    engine = create_crm_engine(crm_url)
    with engine.connect() as conn:
        jobs = [job for messages in warnings_by_task.values() for m in messages for job in _JOB_ID.findall(m)]
        lead_of_job = repository.lead_ids_by_job(conn, jobs)
    engine.dispose()
    lines = ["Warnings, by task (each run's event log in the Dagster UI has them all):"]
    for task_id, messages in sorted(warnings_by_task.items()):
        if messages:
            lines.append(f"  task {task_id} ({names.get(task_id, '')}):")
            lines += [f"    {line}" for line in describe_warnings(messages, lead_of_job)]
    return "\n".join(lines)


def run_round(instance, label: str, warnings_by_task: dict[int, list[str]]) -> list[str]:
    """One sensor tick, then the runs it requested, executed in this process; each run's warnings
    go to `warnings_by_task`."""
    import dagster as dg

    from call_pipeline.definitions import defs
    from call_pipeline.sensors import make_call_task_sensor

    context = dg.build_sensor_context(instance_ref=instance.get_ref(), definitions=defs, resources=defs.resources)
    result = make_call_task_sensor().evaluate_tick(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    job = defs.resolve_job_def(SYNC_JOB_NAME)
    outcomes = []
    for run_request in result.run_requests or []:
        # The console shows errors; the warnings (what the edge cases did) are printed below the
        # tables, by task and lead, from the run's event log.
        outcome = job.execute_in_process(instance=instance, partition_key=run_request.partition_key,
                                         raise_on_error=False,
                                         run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
        warnings_by_task[int(run_request.partition_key)] = run_warnings(instance, outcome.run_id)
        outcomes.append(f"{label}: task {run_request.partition_key} "
                        f"{'succeeded' if outcome.success else 'FAILED'} (run {outcome.run_id[:8]})")
    return outcomes


def run_demo(data_dir: Path = DEMO_DIR) -> int:
    import dagster as dg

    from call_pipeline_tools.simulator.server import start_simulator

    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    crm_url = f"sqlite:///{data_dir / 'crm.sqlite3'}"
    print(f"Demo CRM (SQLite): {data_dir / 'crm.sqlite3'}")
    tasks = seed_demo_crm(crm_url)
    with start_simulator() as simulator:
        print(f"Simulator (OutboundBot + DashScope wire protocol): {simulator.url}")
        prepare_environment(crm_url, simulator, data_dir)
        load_job_groups(simulator, crm_url, tasks)
        (data_dir / "dagster_home").mkdir()
        with dg.DagsterInstance.local_temp(
                tempdir=str(data_dir / "dagster_home"), overrides={"telemetry": {"enabled": False}}) as instance:
            print("\nRound 1: the sensor picks the active tasks and each runs sync_call_task")
            warnings: dict[int, list[str]] = {}
            for line in run_round(instance, "round 1", warnings):
                print("  " + line)
            rows = task_table(crm_url)
            names = {row["id"]: row["task_name"] for row in rows}
            print("\n" + format_table(rows) + "\n\n" + format_warnings(crm_url, warnings, names))

            print("\nRound 2: the cloud moves on (running jobs finish), and the sensor relaunches")
            for spec in tasks.values():
                if spec.job_group_id and spec.task_type == 2:
                    simulator.state.advance(spec.job_group_id, steps=3)
            instance.wipe()  # the sensor's run keys are per interval; start the next interval now
            warnings = {}
            for line in run_round(instance, "round 2", warnings):
                print("  " + line)
            rows = task_table(crm_url)
            print("\n" + format_table(rows) + "\n\n" + format_warnings(crm_url, warnings, names))
    done = {row["id"]: row["task_type"] for row in rows}
    expected = {tid: (4 if spec.job_group_id and spec.task_type == 2 else spec.task_type)
                for tid, spec in tasks.items()}
    ok = done == expected
    print(f"\nEvery task reached the state the contract says: {'yes' if ok else 'NO'} "
          f"(expected {expected}, got {done})")
    return 0 if ok else 1
