"""The Markdown summary attached to a task run's metadata in the Dagster UI."""

from __future__ import annotations

from collections.abc import Mapping

from call_pipeline.domain.followups import SOURCE_AI_FALLBACK, SOURCE_LLM, SOURCE_NO_CONVERSATION
from call_pipeline.domain.task_state import TASK_TYPE_NAMES

_VERDICTS = ((0, "cannot tell"), (1, "interested"), (2, "not interested"))
_SOURCES = ((SOURCE_LLM, "AI analysis"), (SOURCE_NO_CONVERSATION, "no conversation"),
            (SOURCE_AI_FALLBACK, "AI fallback"))
_MATCH_ROWS = (
    ("reference_id", "leads matched by reference_id"),
    ("legacy_reference_id", "leads matched by legacy reference id"),
    ("phone", "leads matched by phone"),
    ("already_matched", "jobs already matched (kept)"),
    ("unmatched_jobs", "jobs left unmatched"),
)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: object) -> str:
    return "0" if value is None else _cell(value)


def _lookup(counts: Mapping, key: object) -> object:
    # Verdict keys arrive as ints from Python and as strings after a JSON round trip.
    return counts.get(key, counts.get(str(key)))


def _task_type(value: object) -> str:
    if value is None:
        return "—"
    name = TASK_TYPE_NAMES.get(value) if isinstance(value, int) else None
    return f"{value} ({name})" if name else _cell(value)


def render_run_summary(stats: dict) -> str:
    """Markdown table of one task run; missing counts show as 0 and a missing state as —.

    Keys read (all optional; `StepCounts.summary_stats` gives them): task_id, jobs_listed,
    match_counts (the MatchResult.counts() keys summed over pages), unmatched_leads_failed,
    statuses ({status: leads}), recordings_fetched, recordings_failed, recordings_invalid_task_id,
    follow_ups_by_verdict ({0|1|2: leads}), follow_ups_by_source ({"llm"|"no_conversation"|
    "ai_fallback": leads}), hot_leads_posted, hot_leads_not_posted, units_given_up, given_up,
    task_type_before, task_type_after, job_group_status (the group's Status the run started from).
    """
    matched = stats.get("match_counts") or {}
    statuses = stats.get("statuses") or {}
    verdicts = stats.get("follow_ups_by_verdict") or {}
    sources = stats.get("follow_ups_by_source") or {}
    verdict_count = {v: _lookup(verdicts, v) for v, _ in _VERDICTS}
    source_count = {k: sources.get(k) for k, _ in _SOURCES}
    fallbacks = source_count[SOURCE_AI_FALLBACK]
    unmatched_failed = stats.get("unmatched_leads_failed")

    rows: list[tuple[str, str]] = [("jobs listed", _number(stats.get("jobs_listed")))]
    rows += [(label, _number(matched.get(key))) for key, label in _MATCH_ROWS]
    rows.append(("unmatched leads marked Failed", _number(unmatched_failed)))
    if statuses:
        ordered = sorted(statuses.items(), key=lambda item: str(item[0]))
        rows += [(f"status {_cell(status)}", _number(count)) for status, count in ordered]
    else:
        rows.append(("statuses", "—"))
    rows.append(("recordings fetched", _number(stats.get("recordings_fetched"))))
    rows.append(("recordings failed", _number(stats.get("recordings_failed"))))
    rows.append(("recordings skipped (invalid task id)", _number(stats.get("recordings_invalid_task_id"))))
    rows += [(f"follow-ups: {label} ({v})", _number(verdict_count[v])) for v, label in _VERDICTS]
    rows += [(f"follow-ups from {label}", _number(source_count[key])) for key, label in _SOURCES]
    rows.append(("AI fallbacks", _number(fallbacks)))
    rows.append(("hot leads posted", _number(stats.get("hot_leads_posted"))))
    rows.append(("hot leads not posted (tried again next run)", _number(stats.get("hot_leads_not_posted"))))
    if "units_given_up" in stats:
        rows.append(("units of one lead given up", _number(stats.get("units_given_up"))))
    before, after = stats.get("task_type_before"), stats.get("task_type_after")
    rows.append(("task state before", _task_type(before)))
    rows.append(("task state after", _task_type(after)))
    rows.append(("job group status", _cell(stats.get("job_group_status") or "—")))

    task_id = stats.get("task_id")
    title = "Run summary" if task_id is None else f"Run summary for task {_cell(task_id)}"
    lines = [f"**{title}**", "", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    given_up = stats.get("given_up") or []
    if given_up:
        lines += ["", "**Given up** (failed in too many runs; named once, when given up):", ""]
        lines += [f"- {_cell(line)}" for line in given_up]
    return "\n".join(lines) + "\n"


# What giving up a unit did to its lead (contract §12).
GIVEN_UP_EFFECT = {
    "call_result": "the job is no longer returned by ListJobs: concluded Failed",
    "recording": "its recording is left empty",
    "follow_up": "the basic record (AI unavailable) was written",
}


def describe_given_up(leads_id: int, call_job_id: str | None, unit: str, attempts: int,
                      last_error: str | None) -> str:
    """One given-up unit, as the run summary and the alert name it."""
    effect = GIVEN_UP_EFFECT.get(unit, "given up")
    return (f"lead {leads_id} (job {call_job_id or '-'}): {unit.replace('_', ' ')} failed in {attempts} runs, "
            f"{effect}; last error: {last_error or 'unknown'}")
