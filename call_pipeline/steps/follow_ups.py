"""Step 5: a follow-up for each lead with a terminal status and none yet."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from call_pipeline.clients.dashscope_llm import LlmClient, LlmError
from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import ensure_pipeline_tables
from call_pipeline.domain.counts import StepReport
from call_pipeline.domain.followups import (
    PLAN_BASIC,
    PLAN_SKIP,
    SOURCE_LLM,
    FollowUp,
    InvalidLlmAnswer,
    ai_fallback_follow_up,
    basic_follow_up,
    build_llm_messages,
    parse_llm_answer,
    plan_follow_up,
)
from call_pipeline.settings import settings
from call_pipeline.steps._concurrent import call_and_write
from call_pipeline.steps.batch import PageBatch
from call_pipeline.steps.env import StepEnv
from call_pipeline.steps.give_up import UnitLedger

# Threads beyond the LLM limit: while some threads' answers wait to be written, the spare ones
# take their slots (the shared semaphore still caps the calls in flight).
SPARE_THREADS = 2
# Follow-ups written in one transaction (an INSERT ... RETURNING and a CASE UPDATE): a commit per
# follow-up was most of the database time.
WRITTEN_TOGETHER = 100
WRITE_AT_LEAST_EVERY_S = 1.0


@dataclass(frozen=True)
class _Decided:
    lead: repo.LeadForFollowUp
    follow_up: FollowUp | None = None
    error: Exception | None = None


def decide_follow_up(llm: LlmClient, lead: repo.LeadForFollowUp, now: datetime,
                     logger: logging.Logger) -> FollowUp | None:
    """One lead's follow-up: the LLM's, the basic one, or the AI fallback; None when the lead
    has none yet (no terminal status). An LLM outage (the account's or the service's failure,
    `LlmError.is_outage`) is no verdict on the lead: it raises, and the lead's unit fails."""
    plan = plan_follow_up(lead.call_status, lead.call_conversation, call_ended=lead.call_ended, now=now,
                          grace_seconds=settings().transcript_grace_seconds)
    if plan == PLAN_SKIP:
        return None
    if plan == PLAN_BASIC:
        return basic_follow_up(lead.call_status or "")
    try:
        answer = llm.complete(build_llm_messages(lead.call_conversation or "[]", now))
        return parse_llm_answer(answer, now)
    except LlmError as exc:
        if exc.is_outage:
            raise
        logger.warning("job %s: AI analysis unavailable, basic follow-up written: %s", lead.call_job_id, exc)
        return ai_fallback_follow_up(exc.code or "LLM error")
    except InvalidLlmAnswer as exc:
        logger.warning("job %s: the model's answer was invalid (%s), basic follow-up written", lead.call_job_id, exc)
        return ai_fallback_follow_up(f"invalid answer: {exc}")


def write_follow_ups(env: StepEnv, batch: PageBatch) -> StepReport:
    """Decides the batch's follow-ups on `env.llm_concurrency` (+ spare) threads and writes them
    as they come, in transactions of up to WRITTEN_TOGETHER leads; each lead's insert and link
    commit together and the link is conditional, so no lead ever gets two. A batch the database
    refuses is written lead by lead, so that only the lead at fault fails. With a ledger, a lead
    whose follow-up failed in `ledger.max_attempts` runs gets the basic record (see `_give_up`)."""
    engine, llm, task_id, job_ids = env.engine, env.llm, batch.task_id, batch.job_ids
    clock, concurrency, logger, ledger = env.clock, env.llm_concurrency, env.logger, env.ledger
    report = StepReport()
    ensure_pipeline_tables(engine)
    failed: dict[int, tuple[repo.LeadForFollowUp, BaseException]] = {}
    written: list[int] = []
    answered = [False]  # some LLM call of the step answered: the service was up
    with engine.connect() as conn:
        leads = repo.fetch_leads_needing_follow_up(conn, task_id, job_ids, now=clock(),
                                                   transcript_grace_seconds=settings().transcript_grace_seconds)

    def decide(lead: repo.LeadForFollowUp) -> _Decided:
        try:
            return _Decided(lead, follow_up=decide_follow_up(llm, lead, clock(), logger))
        except Exception as exc:  # one lead's failure must not lose the others' work
            return _Decided(lead, error=exc)

    conn = engine.connect()  # the step's one connection for its writes; replaced after a failure

    def write(decided: list[_Decided]) -> None:
        nonlocal conn
        items = []
        for item in decided:
            if item.error is not None:
                failed[item.lead.lead_row_id] = (item.lead, item.error)
                _log_failed(logger, task_id, item.lead, item.error)
            elif item.follow_up is not None:
                answered[0] = answered[0] or item.follow_up.source == SOURCE_LLM
                items.append((item.lead, item.follow_up))
        if not items:
            return
        now = clock()
        try:
            follow_ids: list = repo.create_follow_ups_on(conn, items, now)
        except Exception as exc:
            logger.info("task %s: %d follow-up(s) not written together (%s); writing them one by one",
                        task_id, len(items), type(exc).__name__)
            conn = _fresh(engine, conn)
            follow_ids = []
            for lead, follow_up in items:
                try:
                    follow_ids.append(repo.create_follow_up_on(conn, lead, follow_up, now))
                except Exception as lead_exc:
                    failed[lead.lead_row_id] = (lead, lead_exc)
                    _log_failed(logger, task_id, lead, lead_exc)
                    follow_ids.append(False)
                    conn = _fresh(engine, conn)
        for (lead, follow_up), follow_id in zip(items, follow_ids, strict=True):
            if follow_id is None:
                report.counts.follow_ups_written_elsewhere += 1
                logger.info("job %s: follow-up already written by another run", lead.call_job_id)
            elif follow_id is not False:
                written.append(lead.lead_row_id)
                report.counts.follow_ups_by_verdict[follow_up.is_interested] += 1
                report.counts.follow_ups_by_source[follow_up.source] += 1

    try:
        call_and_write(leads, decide, write, threads=concurrency + SPARE_THREADS, batch_size=WRITTEN_TOGETHER,
                       max_wait_s=WRITE_AT_LEAST_EVERY_S, name="call-pipeline-follow-ups", stop=env.stop)
    finally:
        conn.close()
    given_up = _give_up(engine, llm, ledger, task_id, failed, written, answered[0], clock, report, logger)
    for lead_row_id, (lead, exc) in failed.items():
        if lead_row_id not in given_up:
            _failed(report, task_id, lead, exc)
    return report


# The probe's transcript: one line, nothing of any lead's.
_PROBE_CONVERSATION = '[{"Speaker": "Robot", "Script": "您好"}]'


def _counted(exc: BaseException, service_up: bool) -> bool:
    """Whether a failed follow-up counts towards giving the lead up. An LLM outage while the
    service answers nobody is the account's or the service's (arrears, a wrong key, the service
    down): it never counts, or an hour of arrears would give up every lead of every task. An
    outage that only this lead meets while the service answers counts, as any other failure of
    the lead does."""
    if isinstance(exc, LlmError) and exc.is_outage:
        return service_up
    return True


def _service_answers(llm: LlmClient, now: datetime, logger: logging.Logger) -> bool:
    """One LLM call with a neutral transcript: does the service answer at all? Made only when
    every LLM call of a step met an outage, to tell one lead's poison from the account's outage."""
    try:
        llm.complete(build_llm_messages(_PROBE_CONVERSATION, now))
    except LlmError as exc:
        if exc.is_outage:
            logger.warning("the LLM service answers no one (%s): the follow-ups it failed are not counted "
                           "against their leads", exc.code)
            return False
    return True


def _give_up(engine: Engine, llm: LlmClient, ledger: UnitLedger | None, task_id: int,
             failed: dict[int, tuple[repo.LeadForFollowUp, BaseException]], written: list[int], llm_answered: bool,
             clock: Callable[[], datetime], report: StepReport, logger: logging.Logger) -> set[int]:
    """Counts this run's failed follow-ups, clears the written ones, and writes the basic record
    (AI unavailable) for the leads whose follow-up is given up now. Returns those lead rows."""
    if ledger is None:
        return set()
    outages = any(isinstance(exc, LlmError) and exc.is_outage for _, exc in failed.values())
    service_up = llm_answered or (outages and _service_answers(llm, clock(), logger))
    counted = {row: f"{type(exc).__name__}: {exc}" for row, (_, exc) in failed.items() if _counted(exc, service_up)}
    given_up = ledger.record(task_id, repo.UNIT_FOLLOW_UP, counted, written, clock())
    done: set[int] = set()
    for lead_row_id in given_up:
        lead, exc = failed[lead_row_id]
        follow_up = ai_fallback_follow_up(f"given up after {ledger.max_attempts} runs: {_code_of(exc)}")
        try:
            with engine.connect() as conn:
                follow_id = repo.create_follow_up_on(conn, lead, follow_up, clock())
        except Exception as write_exc:  # still failing: the run fails, a later run writes it
            logger.error("task %s job %s: the basic record of a follow-up given up was not written: %s: %s",
                         task_id, lead.call_job_id, type(write_exc).__name__, write_exc)
            continue
        done.add(lead_row_id)
        report.counts.units_given_up += 1
        if follow_id is not None:
            report.counts.follow_ups_by_verdict[follow_up.is_interested] += 1
            report.counts.follow_ups_by_source[follow_up.source] += 1
        logger.warning("task %s job %s: follow-up failed in %d runs: given up, basic record written (%s)",
                       task_id, lead.call_job_id, ledger.max_attempts, exc)
    return done


def _code_of(exc: BaseException) -> str:
    return (getattr(exc, "code", None) or type(exc).__name__) if isinstance(exc, LlmError) else type(exc).__name__


def _fresh(engine: Engine, conn):
    # After a failed write the connection may be dead: go on with a new one.
    with contextlib.suppress(Exception):
        conn.close()
    return engine.connect()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LlmError) and exc.is_outage:
        return f"LLM outage ({exc.code or 'error'}), no verdict written: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _log_failed(logger: logging.Logger, task_id: int, lead: repo.LeadForFollowUp, exc: BaseException) -> None:
    logger.error("task %s job %s: follow-up not written (retried next run): %s",
                 task_id, lead.call_job_id, _describe(exc))


def _failed(report: StepReport, task_id: int, lead: repo.LeadForFollowUp, exc: BaseException) -> None:
    report.counts.follow_ups_failed += 1
    report.fail(f"job {lead.call_job_id}: {_describe(exc)}")
