"""Every SQL statement the pipeline runs against the CRM, in one place.

Each function reads only the rows that still need a step's work, and each write is guarded in
SQL so that any step, run or partition can be re-executed at any time: a rerun writes nothing
twice, and two runs at once cannot both win the same row.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, and_, case, delete, exists, func, literal, not_, or_, select, update

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy import ColumnElement

from call_pipeline.crm.schema import (
    call_pipeline_call_ends,
    call_pipeline_hot_leads_posted,
    call_pipeline_unit_failures,
    call_tasks,
    dcc_leads_follow,
    leads_task_list,
)
from call_pipeline.domain.call_results import (
    CANCELLED,
    FAILED,
    NON_TERMINAL_JOB_STATUSES,
    SUCCEEDED,
    TERMINAL_JOB_STATUSES,
    CallResult,
)
from call_pipeline.domain.followups import FollowUp
from call_pipeline.domain.matching import LeadMatch
from call_pipeline.domain.task_state import TASK_CALLING, TASK_CALLS_DONE, TASK_FOLLOW_UP_DONE, LeadCounts

ACTIVE_TASK_TYPES = (TASK_CALLING, TASK_CALLS_DONE)
_L = leads_task_list


@dataclass(frozen=True)
class TaskRow:
    id: int
    task_name: str
    task_type: int
    job_group_id: str | None
    organization_id: int | None


@dataclass(frozen=True)
class LeadForFollowUp:
    lead_row_id: int
    leads_id: int
    call_job_id: str
    call_status: str | None
    call_conversation: str | None
    call_ended: datetime | None = None  # for a Succeeded call without a transcript (call_pipeline_call_ends)


@dataclass(frozen=True)
class LeadForRecording:
    lead_row_id: int
    call_job_id: str
    call_task_id: str


def _has_text(column):
    return and_(column.is_not(None), column != "")


def _is_blank(column):
    return or_(column.is_(None), column == "")


_sqlite_write_locks: dict[str, threading.RLock] = {}
_sqlite_write_locks_guard = threading.Lock()


def _write_lock(engine: Engine) -> contextlib.AbstractContextManager:
    """SQLite takes one writer at a time, and a writer that finds the database locked sleeps in
    SQLite's busy handler in steps of up to 100 ms. This process's writers (the pipeline's worker
    threads) take turns on a lock here instead; other processes still meet the busy timeout."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    key = str(engine.url)
    with _sqlite_write_locks_guard:
        lock = _sqlite_write_locks.get(key)
        if lock is None:
            lock = _sqlite_write_locks[key] = threading.RLock()
    return lock


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """`engine.begin()` for a transaction that writes (see `_write_lock`)."""
    with _write_lock(engine), engine.begin() as conn:
        yield conn


def _task_row(row) -> TaskRow:
    return TaskRow(
        id=int(row.id),
        task_name=row.task_name,
        task_type=int(row.task_type),
        job_group_id=row.job_group_id,
        organization_id=row.organization_id,
    )


# ---- step 1: tasks ----------------------------------------------------------------------------

_TASK_COLUMNS = (
    call_tasks.c.id,
    call_tasks.c.task_name,
    call_tasks.c.task_type,
    call_tasks.c.job_group_id,
    call_tasks.c.organization_id,
)


def fetch_active_tasks(conn: Connection) -> list[TaskRow]:
    """Step 1: tasks at 2 or 3 with a non-empty job group."""
    stmt = (
        select(*_TASK_COLUMNS)
        .where(call_tasks.c.task_type.in_(ACTIVE_TASK_TYPES), _has_text(call_tasks.c.job_group_id))
        .order_by(call_tasks.c.id)
    )
    return [_task_row(row) for row in conn.execute(stmt)]


def fetch_tasks_in_progress(conn: Connection) -> list[TaskRow]:
    """Tasks at 2 or 3, with or without a job group: the schedule evaluates their state."""
    stmt = select(*_TASK_COLUMNS).where(call_tasks.c.task_type.in_(ACTIVE_TASK_TYPES)).order_by(call_tasks.c.id)
    return [_task_row(row) for row in conn.execute(stmt)]


def fetch_recently_concluded_tasks(conn: Connection, since: datetime) -> list[TaskRow]:
    """Tasks at 4 with a job group, concluded (last updated) at or after `since`: where a job
    that came late can still appear."""
    stmt = (
        select(*_TASK_COLUMNS)
        .where(call_tasks.c.task_type == TASK_FOLLOW_UP_DONE, _has_text(call_tasks.c.job_group_id),
               call_tasks.c.updated_time >= since)
        .order_by(call_tasks.c.id)
    )
    return [_task_row(row) for row in conn.execute(stmt)]


@dataclass(frozen=True)
class LeadWork:
    """A task's leads with a job, of which still calling (a status that is not terminal), and of
    which the CRM holds work for that the cloud is not waiting on (a unit that failed)."""

    matched: int = 0
    calling: int = 0
    work_left: int = 0


def count_lead_work(conn: Connection, task_ids: Sequence[int], *, unposted_hot_leads: bool = False
                    ) -> dict[int, LeadWork]:
    """Per task, in one statement. Work left: a lead with a job and some batch step's work left
    (`StepWork.left`: a job with no status yet, a succeeded call with no recording, a terminal
    status with no follow-up); with `unposted_hot_leads` (a hot-lead webhook is set), also an
    interested lead that no run has posted (call_pipeline_hot_leads_posted)."""
    if not task_ids:
        return {}
    has_job = _has_text(_L.c.call_job_id)
    terminal = _L.c.call_status.in_(sorted(TERMINAL_JOB_STATUSES))
    calling = and_(has_job, not_(_is_blank(_L.c.call_status)), not_(terminal))
    kinds = [work.left() for work in STEP_WORK.values()]
    if unposted_hot_leads:
        kinds.append(and_(_L.c.is_interested == 1, _L.c.leads_follow_id.is_not(None),
                          not_(_L.c.id.in_(select(_H.c.lead_row_id).where(_H.c.task_id.in_(list(task_ids)))))))
    work = and_(has_job, or_(*kinds))
    stmt = (select(_L.c.task_id, _count_where(has_job), _count_where(calling), _count_where(work))
            .where(_L.c.task_id.in_(list(task_ids))).group_by(_L.c.task_id))
    counts = {int(row[0]): LeadWork(*(int(n) for n in row[1:])) for row in conn.execute(stmt)}
    return {task_id: counts.get(task_id, LeadWork()) for task_id in task_ids}


def fetch_task(conn: Connection, task_id: int) -> TaskRow | None:
    row = conn.execute(select(*_TASK_COLUMNS).where(call_tasks.c.id == task_id)).first()
    return _task_row(row) if row else None


# ---- step 2: matching -------------------------------------------------------------------------


def fetch_leads_for_matching(
    conn: Connection, task_id: int, reference_ids: Sequence[str] = (), leads_ids: Sequence[int] = (),
    *, free_leads: bool = True, job_ids: Sequence[str] = (),
) -> pd.DataFrame:
    """The task's leads a page's jobs can concern: every lead without a job (the candidates), plus
    the leads that already have one but whose reference id (or legacy-reference leads_id) the
    page's jobs carry, so that a second job for an already-matched lead is recognised as such
    instead of falling through to phone matching. Reading only these, not every lead of the task
    for every page, keeps matching a large task's pages cheap.

    With `free_leads=False`, only the leads that the page's reference ids name: enough when every
    job of the page matches by reference (new tasks), and far smaller than every free lead of a
    large task, read again for each page. The leads that already hold one of `job_ids` come in
    the same read, so matching sees which of the page's jobs are taken (strategy 4)."""
    import pandas as pd  # here, not with the module: see domain/matching.py

    concerned = [_is_blank(_L.c.call_job_id)] if free_leads else []
    if job_ids:
        concerned.append(_L.c.call_job_id.in_(sorted(set(job_ids))))
    if reference_ids:
        concerned.append(_L.c.reference_id.in_(sorted(set(reference_ids))))
    if leads_ids:
        concerned.append(_L.c.leads_id.in_(sorted(set(leads_ids))))
    columns = ["id", "leads_id", "reference_id", "leads_phone", "call_job_id"]
    if not concerned:
        return pd.DataFrame([], columns=columns)
    stmt = (
        select(_L.c.id, _L.c.leads_id, _L.c.reference_id, _L.c.leads_phone, _L.c.call_job_id)
        .where(_L.c.task_id == task_id, or_(*concerned))
        .order_by(_L.c.id)
    )
    rows = conn.execute(stmt).all()
    return pd.DataFrame(rows, columns=["id", "leads_id", "reference_id", "leads_phone", "call_job_id"])


def assign_jobs_to_leads(conn: Connection, task_id: int, matches: Sequence[LeadMatch], now: datetime) -> int:
    """One bulk, conditional write per page. A lead that got a job meanwhile keeps it, and a
    provisional `Failed` (set while the lead had no job) is cleared so step 3 picks the lead up."""
    if not matches:
        return 0
    job_of = {m.lead_row_id: m.job_id for m in matches}
    stmt = (
        update(_L)
        .where(_L.c.id.in_(list(job_of)), _L.c.task_id == task_id, _is_blank(_L.c.call_job_id))
        .values(call_job_id=case(job_of, value=_L.c.id), call_status=None, updated_time=now)
    )
    return int(conn.execute(stmt).rowcount or 0)


def mark_unmatched_leads_failed(conn: Connection, task_id: int, now: datetime) -> int:
    """After the last page: a lead with no job but with a reference id or a phone is marked
    `Failed` (provisional: a later match clears it)."""
    stmt = (
        update(_L)
        .where(
            _L.c.task_id == task_id,
            _is_blank(_L.c.call_job_id),
            or_(_has_text(_L.c.reference_id), _has_text(_L.c.leads_phone)),
            or_(_L.c.call_status.is_(None), _L.c.call_status != FAILED),
        )
        .values(call_status=FAILED, updated_time=now)
    )
    return int(conn.execute(stmt).rowcount or 0)


def fetch_leads_without_identity(conn: Connection, task_id: int, limit: int = 20) -> tuple[int, list[int]]:
    """Leads with no job and neither a reference id nor a phone (nothing to match a job by):
    how many, and the first `limit` lead ids."""
    where = and_(_L.c.task_id == task_id, _is_blank(_L.c.call_job_id), not_(_has_text(_L.c.reference_id)),
                 not_(_has_text(_L.c.leads_phone)))
    count = int(conn.execute(select(func.count()).select_from(_L).where(where)).scalar_one())
    ids = [int(row.leads_id) for row in conn.execute(select(_L.c.leads_id).where(where).order_by(_L.c.id).limit(limit))]
    return count, ids


# ---- which jobs a run works on (contract: "Which jobs a run works on") ------------------------


def count_held_jobs(conn: Connection, task_id: int) -> int:
    """Distinct jobs the task's leads hold: compared with the group's size, whether paging can
    find a job no lead has."""
    stmt = select(func.count(func.distinct(_L.c.call_job_id))).where(_L.c.task_id == task_id,
                                                                      _has_text(_L.c.call_job_id))
    return int(conn.execute(stmt).scalar_one() or 0)


def fetch_job_ids_needing_work(conn: Connection, task_id: int) -> list[str]:
    """Jobs of the task's leads that some batch step still has work for (`StepWork.planned`: a
    status empty or not terminal, a succeeded call with no recording, a terminal status and no
    follow-up)."""
    stmt = (
        select(_L.c.call_job_id)
        .where(_L.c.task_id == task_id, _has_text(_L.c.call_job_id),
               or_(*(work.planned() for work in STEP_WORK.values())))
        .order_by(_L.c.id)
    )
    return [row.call_job_id for row in conn.execute(stmt)]


# ---- step 3: call results ---------------------------------------------------------------------


def _lacks_recording():
    """A succeeded call (with the call task id its recording is asked by) without a recording."""
    return and_(_L.c.call_status == SUCCEEDED, _has_text(_L.c.call_task_id), _is_blank(_L.c.recording_url))


def _needs_recording():
    """Step 4's work: a lead without a recording, unless its recording was given up."""
    return and_(_lacks_recording(), not_(_given_up(UNIT_RECORDING)))


def _needs_follow_up():
    """Step 5's work: a terminal call status and no follow-up yet."""
    return and_(_L.c.call_status.in_(sorted(TERMINAL_JOB_STATUSES)), _L.c.leads_follow_id.is_(None))


def _not_terminal():
    # Spelled out instead of NOT IN: an expanding IN cannot be used with executemany().
    return or_(_L.c.call_status.is_(None), and_(*(_L.c.call_status != s for s in sorted(TERMINAL_JOB_STATUSES))))


def _needs_result():
    return and_(_has_text(_L.c.call_job_id), _not_terminal())


@dataclass(frozen=True)
class StepWork:
    """The SQL of what one batch step still has to do for a lead with a job. `planned`: a run
    makes a batch for the lead's job (`fetch_job_ids_needing_work`); `left`: the CRM holds work
    for it that the cloud is not waiting on (`count_lead_work`, for the sensors)."""

    planned: Callable[[], ColumnElement[bool]]
    left: Callable[[], ColumnElement[bool]]


# Each batch step's work, by the name its entry in steps/batch_steps.py gives as `work`.
STEP_WORK: dict[str, StepWork] = {
    "call_results": StepWork(planned=_not_terminal, left=lambda: _is_blank(_L.c.call_status)),
    "recordings": StepWork(planned=_lacks_recording, left=_needs_recording),
    "follow_ups": StepWork(planned=_needs_follow_up, left=_needs_follow_up),
}


_E = call_pipeline_call_ends


def _awaiting_transcript(now: datetime, grace_seconds: float):
    """SQL for `domain.followups.transcript_pending` on the CRM's values: Succeeded, no transcript
    and no follow-up yet, its call ended (call_pipeline_call_ends) less than the grace before `now`.
    Never NULL, so that NOT of it is safe beside an outer join."""
    return and_(_L.c.call_status == SUCCEEDED, _is_blank(_L.c.call_conversation), _L.c.leads_follow_id.is_(None),
                _E.c.call_ended_time.is_not(None), _E.c.call_ended_time > now - timedelta(seconds=grace_seconds))


def fetch_job_ids_needing_results(
    conn: Connection, task_id: int, job_ids: Iterable[str] | None = None, *, now: datetime | None = None,
    transcript_grace_seconds: float = 0,
) -> list[str]:
    """Job ids of the task's leads whose status is empty or not yet terminal, and (with a grace)
    of those whose transcript is still awaited."""
    if now is not None and transcript_grace_seconds > 0:
        stmt = (select(_L.c.call_job_id).select_from(_L.outerjoin(_E, _E.c.lead_row_id == _L.c.id))
                .where(_L.c.task_id == task_id,
                       or_(_needs_result(), and_(_has_text(_L.c.call_job_id),
                                                 _awaiting_transcript(now, transcript_grace_seconds))))
                .order_by(_L.c.id))
        if job_ids is not None:
            stmt = stmt.where(_L.c.call_job_id.in_(list(job_ids)))
        return [row.call_job_id for row in conn.execute(stmt)]
    stmt = select(_L.c.call_job_id).where(_L.c.task_id == task_id, _needs_result()).order_by(_L.c.id)
    if job_ids is not None:
        stmt = stmt.where(_L.c.call_job_id.in_(list(job_ids)))
    return [row.call_job_id for row in conn.execute(stmt)]


# Jobs per UPDATE of call results: each row's CASE looks its job up among the statement's WHENs,
# so a statement's server time grows with rows x jobs (MariaDB 10.11, 500 rows with transcripts:
# 45 ms in one statement, 30 ms in five of 100).
RESULTS_PER_STATEMENT = 100


def store_call_results(conn: Connection, task_id: int, results: Sequence[CallResult], now: datetime) -> int:
    """A terminal status is never overwritten: a rerun or a late answer cannot move a lead back.
    One CASE statement per RESULTS_PER_STATEMENT jobs, in the caller's transaction."""
    if not results:
        return 0
    # A job listed twice keeps its terminal answer, else its last one, as one UPDATE per answer in
    # order would.
    by_job: dict[str, CallResult] = {}
    for r in results:
        held = by_job.get(r.job_id)
        if held is None or held.call_status not in TERMINAL_JOB_STATUSES:
            by_job[r.job_id] = r
    jobs = list(by_job.items())
    stored = 0
    for start in range(0, len(jobs), RESULTS_PER_STATEMENT):
        chunk = dict(jobs[start:start + RESULTS_PER_STATEMENT])

        def per_job(attribute: str, type_, chunk=chunk):
            return case({job_id: literal(getattr(r, attribute), type_) for job_id, r in chunk.items()},
                        value=_L.c.call_job_id)

        stmt = (
            update(_L)
            .where(_L.c.task_id == task_id, _L.c.call_job_id.in_(list(chunk)), _not_terminal())
            .values(
                call_status=per_job("call_status", _L.c.call_status.type),
                call_conversation=per_job("call_conversation", _L.c.call_conversation.type),
                planed_time=per_job("planed_time", _L.c.planed_time.type),
                updated_time=now,
                call_task_id=per_job("call_task_id", _L.c.call_task_id.type),
                calling_number=per_job("calling_number", _L.c.calling_number.type),
            )
        )
        stored += int(conn.execute(stmt).rowcount or 0)
    stored += _store_late_transcripts(conn, task_id, by_job, now)
    _record_call_ends(conn, task_id, by_job, now)
    return stored


def _store_late_transcripts(conn: Connection, task_id: int, by_job: dict[str, CallResult], now: datetime) -> int:
    """A transcript that came after its Succeeded status was stored: written to a lead that has
    none and no follow-up yet (the only update of a terminal lead)."""
    late = {job_id: r for job_id, r in by_job.items() if r.call_status == SUCCEEDED and r.call_conversation}
    stored = 0
    jobs = list(late.items())
    for start in range(0, len(jobs), RESULTS_PER_STATEMENT):
        chunk = dict(jobs[start:start + RESULTS_PER_STATEMENT])

        def per_job(attribute: str, type_, chunk=chunk):
            return case({job_id: literal(getattr(r, attribute), type_) for job_id, r in chunk.items()},
                        value=_L.c.call_job_id)

        stmt = (
            update(_L)
            .where(_L.c.task_id == task_id, _L.c.call_job_id.in_(list(chunk)), _L.c.call_status == SUCCEEDED,
                   _is_blank(_L.c.call_conversation), _L.c.leads_follow_id.is_(None))
            .values(call_conversation=per_job("call_conversation", _L.c.call_conversation.type),
                    planed_time=per_job("planed_time", _L.c.planed_time.type),
                    call_task_id=per_job("call_task_id", _L.c.call_task_id.type),
                    calling_number=per_job("calling_number", _L.c.calling_number.type),
                    updated_time=now)
        )
        stored += int(conn.execute(stmt).rowcount or 0)
    return stored


def _record_call_ends(conn: Connection, task_id: int, by_job: dict[str, CallResult], now: datetime) -> None:
    """When each Succeeded call without a transcript ended (its attempt's times; `now` when they
    say nothing), kept once per lead: the start of its wait for a transcript that comes late. A
    job with no call attempt at all has no call to wait for."""
    ended = {job_id: r.call_ended or now for job_id, r in by_job.items()
             if r.call_status == SUCCEEDED and not r.call_conversation
             and (r.call_ended is not None or r.call_task_id is not None)}
    if not ended:
        return
    rows = conn.execute(
        select(_L.c.id, _L.c.call_job_id)
        .where(_L.c.task_id == task_id, _L.c.call_job_id.in_(list(ended)), _L.c.leads_follow_id.is_(None))
    ).all()
    if not rows:
        return
    held = set(conn.execute(select(_E.c.lead_row_id).where(_E.c.lead_row_id.in_([r.id for r in rows]))).scalars())
    new = [{"lead_row_id": int(r.id), "task_id": task_id, "call_ended_time": ended[r.call_job_id]}
           for r in rows if r.id not in held]
    if new:
        # Another run may record the same lead meanwhile: its row is as good as this one.
        conn.execute(_E.insert().prefix_with("IGNORE", dialect="mysql").prefix_with("IGNORE", dialect="mariadb")
                     .prefix_with("OR IGNORE", dialect="sqlite"), new)


# ---- step 4: recordings -----------------------------------------------------------------------


def fetch_leads_needing_recording(
    conn: Connection, task_id: int, job_ids: Iterable[str] | None = None
) -> list[LeadForRecording]:
    """Succeeded calls without a recording, except those whose recording was given up."""
    stmt = (
        select(_L.c.id, _L.c.call_job_id, _L.c.call_task_id)
        .where(
            _L.c.task_id == task_id,
            _needs_recording(),
        )
        .order_by(_L.c.id)
    )
    if job_ids is not None:
        stmt = stmt.where(_L.c.call_job_id.in_(list(job_ids)))
    return [LeadForRecording(int(r.id), r.call_job_id, r.call_task_id) for r in conn.execute(stmt)]


def store_recording_urls(conn: Connection, urls: Sequence[tuple[int, str]], now: datetime) -> int:
    """`urls` is (lead row id, SignatureUrl); only a lead still without a recording is written."""
    if not urls:
        return 0
    url_of = dict(urls)
    stmt = (
        update(_L)
        .where(_L.c.id.in_(list(url_of)), _is_blank(_L.c.recording_url))
        .values(recording_url=case(url_of, value=_L.c.id), updated_time=now)
    )
    return int(conn.execute(stmt).rowcount or 0)


# ---- step 5: follow-ups -----------------------------------------------------------------------


def fetch_leads_needing_follow_up(
    conn: Connection, task_id: int, job_ids: Iterable[str] | None = None, *, now: datetime | None = None,
    transcript_grace_seconds: float = 0,
) -> list[LeadForFollowUp]:
    """With a grace: not the leads whose transcript is still awaited (`_awaiting_transcript`),
    and each Succeeded lead comes with when its call ended."""
    if now is not None and transcript_grace_seconds > 0:
        stmt = (
            select(_L.c.id, _L.c.leads_id, _L.c.call_job_id, _L.c.call_status, _L.c.call_conversation,
                   _E.c.call_ended_time)
            .select_from(_L.outerjoin(_E, _E.c.lead_row_id == _L.c.id))
            .where(
                _L.c.task_id == task_id,
                _has_text(_L.c.call_job_id),
                _needs_follow_up(),
                not_(_awaiting_transcript(now, transcript_grace_seconds)),
            )
            .order_by(_L.c.id)
        )
        if job_ids is not None:
            stmt = stmt.where(_L.c.call_job_id.in_(list(job_ids)))
        return [LeadForFollowUp(int(r.id), int(r.leads_id), r.call_job_id, r.call_status, r.call_conversation,
                                r.call_ended_time) for r in conn.execute(stmt)]
    stmt = (
        select(_L.c.id, _L.c.leads_id, _L.c.call_job_id, _L.c.call_status, _L.c.call_conversation)
        .where(
            _L.c.task_id == task_id,
            _has_text(_L.c.call_job_id),
            _needs_follow_up(),
        )
        .order_by(_L.c.id)
    )
    if job_ids is not None:
        stmt = stmt.where(_L.c.call_job_id.in_(list(job_ids)))
    return [
        LeadForFollowUp(int(r.id), int(r.leads_id), r.call_job_id, r.call_status, r.call_conversation)
        for r in conn.execute(stmt)
    ]


def create_follow_up_on(conn: Connection, lead: LeadForFollowUp, follow_up: FollowUp, now: datetime) -> int | None:
    """Insert one lead's follow-up and link it to the lead in ONE transaction of its own, on a
    connection the caller holds (with no transaction open). The link is conditional on
    `leads_follow_id IS NULL`: when another run got there first the insert is rolled back, so a
    lead never has two follow-ups. Returns the new follow id, or None when another run won."""
    with _write_lock(conn.engine), conn.begin() as tx:
        follow_id = conn.execute(
            dcc_leads_follow.insert().values(
                leads_id=lead.leads_id,
                follow_time=now,
                leads_remark=follow_up.leads_remark,
                frist_follow_time=now,
                new_follow_time=now,
                next_follow_time=follow_up.next_follow_time,
            )
        ).inserted_primary_key[0]
        linked = conn.execute(
            update(_L)
            .where(_L.c.id == lead.lead_row_id, _L.c.leads_follow_id.is_(None))
            .values(leads_follow_id=follow_id, is_interested=follow_up.is_interested, updated_time=now)
        ).rowcount
        if not linked:
            tx.rollback()
            return None
    return int(follow_id)


def create_follow_ups_on(
    conn: Connection, items: Sequence[tuple[LeadForFollowUp, FollowUp]], now: datetime
) -> list[int | None]:
    """Several leads' follow-ups in ONE transaction, normally in two statements: insert their
    follow-ups (one INSERT ... RETURNING) and link them (one CASE UPDATE, still conditional on
    `leads_follow_id IS NULL`). A lead that got a follow-up elsewhere keeps it: when the link
    count falls short, the follow-ups that did not get linked are deleted again in the same
    transaction, so each lead's insert and link commit together, as in `create_follow_up_on`,
    at a fraction of its round trips and commits. Returns each item's follow id, or None for a
    lead that already had a follow-up (or that came twice in `items`: the first one is written)."""
    first: dict[int, tuple[LeadForFollowUp, FollowUp]] = {}
    for lead, follow_up in items:
        first.setdefault(lead.lead_row_id, (lead, follow_up))
    todo = list(first.values())
    follow_ids: dict[int, int] = {}
    with _write_lock(conn.engine), conn.begin():
        if todo:
            inserted = conn.execute(
                dcc_leads_follow.insert().returning(dcc_leads_follow.c.id, sort_by_parameter_order=True),
                [{"leads_id": lead.leads_id, "follow_time": now, "leads_remark": follow_up.leads_remark,
                  "frist_follow_time": now, "new_follow_time": now, "next_follow_time": follow_up.next_follow_time}
                 for lead, follow_up in todo],
            ).scalars().all()
            follow_ids = {lead.lead_row_id: int(fid) for (lead, _), fid in zip(todo, inserted, strict=True)}
            # The link takes the leads' row locks; a lead linked by another transaction meanwhile
            # no longer matches `leads_follow_id IS NULL` and is left as it is.
            linked = conn.execute(
                update(_L)
                .where(_L.c.id.in_(list(follow_ids)), _L.c.leads_follow_id.is_(None))
                .values(
                    leads_follow_id=case(follow_ids, value=_L.c.id),
                    is_interested=case({lead.lead_row_id: f.is_interested for lead, f in todo}, value=_L.c.id),
                    updated_time=now,
                )
            ).rowcount
            if linked != len(follow_ids):
                held = dict(conn.execute(
                    select(_L.c.id, _L.c.leads_follow_id).where(_L.c.id.in_(list(follow_ids)))
                ).all())
                orphans = [fid for lead_row_id, fid in follow_ids.items() if held.get(lead_row_id) != fid]
                conn.execute(delete(dcc_leads_follow).where(dcc_leads_follow.c.id.in_(orphans)))
                follow_ids = {k: v for k, v in follow_ids.items() if held.get(k) == v}
    seen: set[int] = set()
    results: list[int | None] = []
    for lead, _ in items:
        fid = follow_ids.get(lead.lead_row_id) if lead.lead_row_id not in seen else None
        seen.add(lead.lead_row_id)
        results.append(fid)
    return results


# ---- hot leads (steps/hot_leads.py) ------------------------------------------------------------

_H = call_pipeline_hot_leads_posted


@dataclass(frozen=True)
class HotLeadRow:
    lead_row_id: int
    task_id: int
    task_name: str
    leads_id: int
    leads_phone: str | None
    leads_remark: str | None
    next_follow_time: datetime | None


def fetch_hot_leads_to_post(conn: Connection, task_id: int, job_ids: Iterable[str] | None = None,
                            limit: int | None = None) -> list[HotLeadRow]:
    """The task's leads the AI marked interested (`is_interested = 1`, with their follow-up) that
    no run has claimed for a post yet."""
    stmt = (
        select(_L.c.id, _L.c.task_id, call_tasks.c.task_name, _L.c.leads_id, _L.c.leads_phone,
               dcc_leads_follow.c.leads_remark, dcc_leads_follow.c.next_follow_time)
        .select_from(_L.join(dcc_leads_follow, dcc_leads_follow.c.id == _L.c.leads_follow_id)
                     .join(call_tasks, call_tasks.c.id == _L.c.task_id)
                     .outerjoin(_H, _H.c.lead_row_id == _L.c.id))
        .where(_L.c.task_id == task_id, _L.c.is_interested == 1, _H.c.lead_row_id.is_(None))
        .order_by(_L.c.id)
    )
    if job_ids is not None:
        stmt = stmt.where(_L.c.call_job_id.in_(list(job_ids)))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [HotLeadRow(int(r.id), int(r.task_id), r.task_name, int(r.leads_id), r.leads_phone, r.leads_remark,
                       r.next_follow_time) for r in conn.execute(stmt)]


def claim_hot_lead(conn: Connection, lead_row_id: int, task_id: int, token: str, now: datetime) -> bool:
    """Claims one lead for a post (its row, inserted unless there is one); False when another
    run holds it. The primary key makes it one winner, whatever runs try at once."""
    inserted = conn.execute(
        _H.insert().prefix_with("IGNORE", dialect="mysql").prefix_with("IGNORE", dialect="mariadb")
        .prefix_with("OR IGNORE", dialect="sqlite"),
        {"lead_row_id": lead_row_id, "task_id": task_id, "claim_token": token, "claimed_time": now},
    ).rowcount
    return bool(inserted)


def mark_hot_lead_posted(conn: Connection, lead_row_id: int, token: str, now: datetime) -> None:
    conn.execute(update(_H).where(_H.c.lead_row_id == lead_row_id, _H.c.claim_token == token)
                 .values(posted_time=now))


def release_hot_lead(conn: Connection, lead_row_id: int, token: str) -> None:
    """A post that failed: its claim goes, so that a later run posts the lead."""
    conn.execute(delete(_H).where(_H.c.lead_row_id == lead_row_id, _H.c.claim_token == token,
                                  _H.c.posted_time.is_(None)))


# ---- task state -------------------------------------------------------------------------------


def _count_where(condition):
    # Portable conditional count: MySQL/MariaDB have no aggregate FILTER clause.
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def count_task_leads(conn: Connection, task_id: int) -> LeadCounts:
    """Only leads with a job count (contract: "Task state")."""
    has_job = _has_text(_L.c.call_job_id)
    terminal = _L.c.call_status.in_(sorted(TERMINAL_JOB_STATUSES))
    stmt = select(
        _count_where(has_job),
        _count_where(and_(has_job, terminal)),
        _count_where(and_(has_job, _L.c.is_interested.is_not(None))),
    ).where(_L.c.task_id == task_id)
    with_job, with_terminal, with_interest = conn.execute(stmt).one()
    return LeadCounts(
        with_job=int(with_job or 0),
        with_terminal_status=int(with_terminal or 0),
        with_interest=int(with_interest or 0),
    )


def advance_task_type(conn: Connection, task_id: int, from_type: int, to_type: int, now: datetime) -> bool:
    """Transitions only go up, guarded in SQL: the update applies only while the task is still
    at `from_type`."""
    if to_type <= from_type:
        return False
    stmt = (
        update(call_tasks)
        .where(call_tasks.c.id == task_id, call_tasks.c.task_type == from_type)
        .values(task_type=to_type, updated_time=now)
    )
    return bool(conn.execute(stmt).rowcount)


def count_statuses(conn: Connection, task_id: int) -> dict[str, int]:
    """Leads per call_status, for the run summary."""
    stmt = (
        select(func.coalesce(_L.c.call_status, ""), func.count())
        .where(_L.c.task_id == task_id)
        .group_by(func.coalesce(_L.c.call_status, ""))
    )
    return {(status or "(none)"): int(n) for status, n in conn.execute(stmt)}


def task_progress(conn: Connection) -> list[dict]:
    """Per task, what the pipeline has written: for the demo's and the benchmark's tables."""
    has_job = _has_text(_L.c.call_job_id)
    stmt = (
        select(
            call_tasks.c.id, call_tasks.c.task_name, call_tasks.c.task_type,
            func.count(_L.c.id).label("leads"),
            _count_where(has_job).label("matched"),
            _count_where(and_(not_(has_job), _L.c.call_status == FAILED)).label("unmatched"),
            _count_where(and_(not_(has_job), not_(_has_text(_L.c.call_status)))).label("untouched"),
            _count_where(_L.c.call_status == SUCCEEDED).label("succeeded"),
            _count_where(and_(has_job, _L.c.call_status == FAILED)).label("failed"),
            _count_where(_L.c.call_status == CANCELLED).label("cancelled"),
            _count_where(_L.c.call_status.in_(sorted(NON_TERMINAL_JOB_STATUSES))).label("running"),
            _count_where(_has_text(_L.c.recording_url)).label("recordings"),
            func.count(_L.c.leads_follow_id).label("follow_ups"),
            _count_where(_L.c.is_interested == 1).label("interested"),
            _count_where(_L.c.is_interested == 2).label("not_interested"),
            _count_where(_L.c.is_interested == 0).label("cannot_tell"),
        )
        .select_from(call_tasks.outerjoin(_L, _L.c.task_id == call_tasks.c.id))
        .group_by(call_tasks.c.id, call_tasks.c.task_name, call_tasks.c.task_type)
        .order_by(call_tasks.c.id)
    )
    return [{k: (int(v) if k not in ("task_name",) and v is not None else v) for k, v in row._mapping.items()}
            for row in conn.execute(stmt)]


def lead_ids_by_job(conn: Connection, job_ids: Iterable[str]) -> dict[str, int]:
    """The lead each of `job_ids` is matched to: to name leads, not job ids, in what people read."""
    ids = sorted(set(job_ids))
    found: dict[str, int] = {}
    for start in range(0, len(ids), 500):
        stmt = select(_L.c.call_job_id, _L.c.leads_id).where(_L.c.call_job_id.in_(ids[start:start + 500]))
        found.update({row.call_job_id: int(row.leads_id) for row in conn.execute(stmt)})
    return found


# ---- units that keep failing (the pipeline's own table) ----------------------------------------

_U = call_pipeline_unit_failures
UNIT_CALL_RESULT, UNIT_RECORDING, UNIT_FOLLOW_UP = "call_result", "recording", "follow_up"


def _given_up(unit: str):
    """The lead row (of `leads_task_list` in the enclosing statement) has `unit` given up."""
    return exists().where(_U.c.lead_row_id == _L.c.id, _U.c.unit == unit, _U.c.given_up.is_(True))


@dataclass(frozen=True)
class GivenUpUnit:
    lead_row_id: int
    leads_id: int
    call_job_id: str | None
    unit: str
    attempts: int
    last_error: str | None


def lead_rows_of_jobs(conn: Connection, task_id: int, job_ids: Iterable[str]) -> dict[str, int]:
    """The lead row holding each of `job_ids` in the task."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    stmt = select(_L.c.call_job_id, _L.c.id).where(_L.c.task_id == task_id, _L.c.call_job_id.in_(ids))
    return {row.call_job_id: int(row.id) for row in conn.execute(stmt)}


def count_unit_failures(conn: Connection, task_id: int, unit: str, errors: dict[int, str], run_id: str,
                        max_attempts: int, now: datetime) -> list[int]:
    """Counts one failed run for each lead row of `errors` (lead row id → why), at most once per
    run (a retry of the step in the same run only updates the error), and gives up the unit of
    those that reached `max_attempts` runs. Returns the lead rows given up (now, or before and
    failing again: their step concludes them again, which is idempotent)."""
    if not errors:
        return []
    held = {int(row.lead_row_id): row for row in conn.execute(
        select(_U.c.lead_row_id, _U.c.attempts, _U.c.last_run_id, _U.c.given_up)
        .where(_U.c.unit == unit, _U.c.lead_row_id.in_(list(errors))))}
    given_up_now: list[int] = []
    for lead_row_id, error in errors.items():
        row = held.get(lead_row_id)
        attempts = 1 if row is None else int(row.attempts) + (row.last_run_id != run_id)
        # Returned again when a unit given up fails once more (its conclusion was not written).
        give_up = attempts >= max_attempts
        values = {"attempts": attempts, "last_error": (error or "")[:1000], "last_run_id": run_id,
                  "updated_time": now}
        if give_up:
            values["given_up"] = True
            given_up_now.append(lead_row_id)
        if row is None:
            conn.execute(_U.insert().values(task_id=task_id, lead_row_id=lead_row_id, unit=unit, given_up=give_up,
                                            alerted=False, **{k: v for k, v in values.items() if k != "given_up"}))
        else:
            conn.execute(update(_U).where(_U.c.lead_row_id == lead_row_id, _U.c.unit == unit).values(**values))
    return given_up_now


def clear_unit_failures(conn: Connection, task_id: int, unit: str, lead_row_ids: Iterable[int]) -> int:
    """A success clears the count (a unit given up stays so: its lead is named in the history)."""
    ids = sorted(set(lead_row_ids))
    if not ids:
        return 0
    stmt = delete(_U).where(_U.c.task_id == task_id, _U.c.unit == unit, _U.c.lead_row_id.in_(ids),
                            _U.c.given_up.is_(False))
    return int(conn.execute(stmt).rowcount or 0)


def lead_rows_with_failures(conn: Connection, task_id: int, unit: str) -> set[int]:
    """Lead rows of the task with a failure counted for `unit` (not given up): those whose
    success must clear it."""
    stmt = select(_U.c.lead_row_id).where(_U.c.task_id == task_id, _U.c.unit == unit, _U.c.given_up.is_(False))
    return {int(row.lead_row_id) for row in conn.execute(stmt)}


def conclude_jobs_failed(conn: Connection, task_id: int, lead_row_ids: Iterable[int], now: datetime) -> int:
    """A job that ListJobs no longer returns, given up: its lead is concluded `Failed` (only while
    its status is still not terminal)."""
    ids = sorted(set(lead_row_ids))
    if not ids:
        return 0
    stmt = (update(_L).where(_L.c.task_id == task_id, _L.c.id.in_(ids), _not_terminal())
            .values(call_status=FAILED, updated_time=now))
    return int(conn.execute(stmt).rowcount or 0)


def fetch_given_up_not_alerted(conn: Connection, task_id: int) -> list[GivenUpUnit]:
    """The task's units given up since its last alert, with their lead."""
    stmt = (
        select(_U.c.lead_row_id, _L.c.leads_id, _L.c.call_job_id, _U.c.unit, _U.c.attempts, _U.c.last_error)
        .select_from(_U.join(_L, _L.c.id == _U.c.lead_row_id))
        .where(_U.c.task_id == task_id, _U.c.given_up.is_(True), _U.c.alerted.is_(False))
        .order_by(_U.c.lead_row_id, _U.c.unit)
    )
    return [GivenUpUnit(int(r.lead_row_id), int(r.leads_id), r.call_job_id, r.unit, int(r.attempts), r.last_error)
            for r in conn.execute(stmt)]


def mark_given_up_alerted(conn: Connection, task_id: int, units: Iterable[GivenUpUnit], now: datetime) -> int:
    done = 0
    for item in units:
        done += int(conn.execute(
            update(_U).where(_U.c.task_id == task_id, _U.c.lead_row_id == item.lead_row_id, _U.c.unit == item.unit)
            .values(alerted=True, updated_time=now)).rowcount or 0)
    return done
