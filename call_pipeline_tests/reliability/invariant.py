"""The invariant every fault test checks, written once.

For a scenario S and a fault F: run S with F (re-executing from failure, relaunching, as an
operator and the sensor would), then compare the CRM with a clean run of S. Equal, ignoring
timestamps: per lead, call_job_id, call_status, call_task_id, call_conversation, whether it has
a recording, is_interested, the kind of follow-up and exactly one follow-up record per lead that
should have one; and the task's task_type. At no point (checked after every run, and by
`Monitor` many times a second during runs) does a task_type go down, is a job written to two
leads, or is a follow-up record visible that no lead (or more than one) links to.

LLM faults that exhaust the retries legitimately end in the AI-fallback follow-up
(is_interested 0, remark "AI分析不可用…"): the contract ("AI fallback") makes that the basic record. Tests of
such faults name those leads in `expect_fallback` (or allow any lead with `allow_fallback`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import call_tasks, dcc_leads_follow, leads_task_list
from call_pipeline.domain.followups import AI_UNAVAILABLE_REMARK_PREFIX

_L, _F = leads_task_list, dcc_leads_follow
ANY = "any"


def _remark_kind(remark: str | None) -> str | None:
    if remark is None:
        return None
    if remark.startswith(AI_UNAVAILABLE_REMARK_PREFIX):
        return "ai_fallback"
    if remark in ("呼叫失败；", "外呼已完成，但暂无通话内容；") or remark.startswith("外呼状态："):
        return f"basic:{remark}"
    return "llm"


def normalized(crm_url: str, task_id: int) -> dict:
    """The task's CRM state with timestamps and generated ids left out."""
    with get_crm_engine(crm_url).connect() as conn:
        task_type = conn.execute(sa.select(call_tasks.c.task_type).where(call_tasks.c.id == task_id)).scalar_one()
        leads = conn.execute(sa.select(_L).where(_L.c.task_id == task_id).order_by(_L.c.id)).all()
        follow_ids = [lead.leads_follow_id for lead in leads if lead.leads_follow_id is not None]
        remarks = dict(conn.execute(sa.select(_F.c.id, _F.c.leads_remark).where(_F.c.id.in_(follow_ids))).all())
        per_lead = Counter(leads_id for (leads_id,) in conn.execute(
            sa.select(_F.c.leads_id).where(_F.c.leads_id.in_([lead.leads_id for lead in leads]))))
    out = {}
    for lead in leads:
        out[int(lead.leads_id)] = {
            "call_job_id": lead.call_job_id,
            "call_status": lead.call_status,
            "call_task_id": lead.call_task_id,
            "call_conversation": lead.call_conversation,
            "has_recording": bool(lead.recording_url),
            "is_interested": lead.is_interested,
            "follow_up": _remark_kind(remarks.get(lead.leads_follow_id)) if lead.leads_follow_id else None,
            "follow_up_records": per_lead.get(int(lead.leads_id), 0),
        }
    return {"task_type": int(task_type), "leads": out}


def assert_matches_clean_run(actual: dict, clean: dict, *, expect_fallback: Iterable[int] = (),
                             allow_fallback: Iterable[int] | str = ()) -> None:
    """`actual` (after the fault) equals `clean` (a clean run of the same scenario). Leads in
    `expect_fallback` must have the AI-fallback follow-up instead of the clean verdict; leads in
    `allow_fallback` (or every lead, with ANY) may have either."""
    expect = set(expect_fallback)
    problems = []
    if actual["task_type"] != clean["task_type"]:
        problems.append(f"task_type {actual['task_type']} != clean {clean['task_type']}")
    if set(actual["leads"]) != set(clean["leads"]):
        problems.append(f"leads differ: {sorted(set(actual['leads']) ^ set(clean['leads']))}")
    for leads_id, want in clean["leads"].items():
        got = actual["leads"].get(leads_id)
        if got is None:
            continue
        want = dict(want)
        may_fall_back = allow_fallback == ANY or leads_id in set(allow_fallback or ())
        if leads_id in expect or (may_fall_back and got["follow_up"] == "ai_fallback"):
            if want["follow_up"] != "llm" and leads_id in expect:
                problems.append(f"lead {leads_id}: expected an LLM follow-up in the clean run to fall back from")
            if want["follow_up"] == "llm":
                want.update(follow_up="ai_fallback", is_interested=0)
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        if diff:
            problems.append(f"lead {leads_id}: " + ", ".join(f"{k}={g!r} (clean: {w!r})" for k, (g, w) in diff.items()))
    assert not problems, "CRM differs from the clean run:\n  " + "\n  ".join(problems[:40])


def assert_one_follow_up_per_lead(state: dict) -> None:
    for leads_id, lead in state["leads"].items():
        want = 1 if lead["follow_up"] else 0
        assert lead["follow_up_records"] == want, f"lead {leads_id} has {lead['follow_up_records']} follow-up rows"


# ---- the invariants that hold at every moment ------------------------------------------------


def violations(conn: sa.Connection, task_id: int, highest_task_type: list[int], prefix: str = "") -> list[str]:
    """What breaks "at no point": task_type down, a job on two leads, a follow-up record that is
    linked from no lead or from several, a lead linked to a missing record. `prefix` qualifies
    the tables (`db.`) for a connection without a default database."""
    found = []
    task_type = conn.execute(sa.text(f"SELECT task_type FROM {prefix}call_tasks WHERE id = :t"),
                             {"t": task_id}).scalar()
    if task_type is not None:
        if task_type < highest_task_type[0]:
            found.append(f"task {task_id}: task_type went down from {highest_task_type[0]} to {task_type}")
        highest_task_type[0] = max(highest_task_type[0], int(task_type))
    for job_id, n in conn.execute(sa.text(
            f"SELECT call_job_id, COUNT(*) FROM {prefix}leads_task_list WHERE call_job_id IS NOT NULL "
            "AND call_job_id <> '' GROUP BY call_job_id HAVING COUNT(*) > 1")):
        found.append(f"job {job_id} is written to {n} leads")
    for follow_id, n in conn.execute(sa.text(
            f"SELECT f.id, COUNT(l.id) FROM {prefix}dcc_leads_follow f LEFT JOIN {prefix}leads_task_list l "
            "ON l.leads_follow_id = f.id GROUP BY f.id HAVING COUNT(l.id) <> 1")):
        found.append(f"follow-up record {follow_id} is linked from {n} leads (half-written or shared)")
    for (lead_row,) in conn.execute(sa.text(
            f"SELECT l.id FROM {prefix}leads_task_list l LEFT JOIN {prefix}dcc_leads_follow f "
            "ON f.id = l.leads_follow_id WHERE l.leads_follow_id IS NOT NULL AND f.id IS NULL")):
        found.append(f"lead row {lead_row} links to a follow-up record that does not exist")
    for leads_id, n in conn.execute(sa.text(
            f"SELECT leads_id, COUNT(*) FROM {prefix}dcc_leads_follow GROUP BY leads_id HAVING COUNT(*) > 1")):
        found.append(f"lead {leads_id} has {n} follow-up records")
    return found


def check_always(crm_url: str, task_id: int, highest_task_type: list[int]) -> None:
    with get_crm_engine(crm_url).connect() as conn:
        found = violations(conn, task_id, highest_task_type)
    assert not found, "invariant broken: " + "; ".join(found)


class Monitor:
    """Samples the invariants from its own connection many times a second while runs go on.
    On MySQL the connection has no default database, so that tests killing the pipeline's
    connections (`information_schema.PROCESSLIST` by database) never kill it."""

    def __init__(self, crm_url: str, task_ids: Iterable[int], interval_s: float = 0.05) -> None:
        url = make_url(crm_url)
        self.prefix = ""
        if url.get_backend_name() in ("mysql", "mariadb"):
            self.prefix = f"`{url.database}`."
            url = url.set(database=None)
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
        self.task_ids = list(task_ids)
        self.interval_s = interval_s
        self.highest = {t: [0] for t in self.task_ids}
        self.found: list[str] = []
        self.samples = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="invariant-monitor", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.engine.connect() as conn:
                    while not self._stop.is_set():
                        for task_id in self.task_ids:
                            for problem in violations(conn, task_id, self.highest[task_id], self.prefix):
                                if problem not in self.found:
                                    self.found.append(problem)
                        self.samples += 1
                        time.sleep(self.interval_s)
            except sa.exc.DBAPIError:
                self.errors += 1  # the database was unreachable for a moment (a test's own fault)
                time.sleep(self.interval_s)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.engine.dispose()
        if exc[0] is None:
            assert self.samples > 0, "the invariant monitor never sampled"
            assert not self.found, "invariant broken during the runs: " + "; ".join(self.found[:20])
