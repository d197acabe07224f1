"""Step 2: which OutboundBot job belongs to which lead of a call task.

Matching is done in memory, one page of jobs against all the task's leads, so the caller can write
each page's matches in one bulk update (contract: "Matching").

pandas (0.4 s to import) is imported by the functions that build frames, not with the module:
the processes that load the definitions without matching (the run process, the daemon, the
webserver) start that much sooner; the step processes' forkserver preloads it
(executors.PRELOADED_MODULES).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from call_pipeline.domain._values import clean_text
from call_pipeline.domain.phones import is_masked_phone, mask_phone, phone_key

STRATEGY_REFERENCE_ID = "reference_id"
STRATEGY_LEGACY_REFERENCE_ID = "legacy_reference_id"
STRATEGY_PHONE = "phone"

LEAD_COLUMNS = ("id", "leads_id", "reference_id", "leads_phone", "call_job_id")


def legacy_reference_id(task_id: int, leads_id: int) -> str:
    """The reference id that tasks created before `reference_id` existed gave their contacts."""
    return f"task_{task_id}_lead_{leads_id}"


_LEGACY_REFERENCE = re.compile(r"task_(\d+)_lead_(\d+)")


def legacy_leads_ids(task_id: int, reference_ids: Iterable[str]) -> list[int]:
    """The leads ids that legacy reference ids of `task_id` name (others are ignored)."""
    return [int(m.group(2)) for ref in reference_ids
            if (m := _LEGACY_REFERENCE.fullmatch(ref)) and int(m.group(1)) == task_id]


@dataclass(frozen=True)
class JobContacts:
    """What one ListJobsByGroup job offers for matching (phones as the API wrote them)."""

    job_id: str
    reference_ids: tuple[str, ...]
    phones: tuple[str, ...]


@dataclass
class ParsedPage:
    jobs: list[JobContacts]
    total_count: int
    problems: list[str] = field(default_factory=list)
    # What the cloud says of the page itself (contract: "Pages are what the cloud sent"): the
    # PageSize it echoes (None: absent or not a number) and the length of its List.
    page_size: int | None = None
    listed: int = 0


@dataclass(frozen=True)
class LeadMatch:
    lead_row_id: int
    job_id: str
    strategy: str


@dataclass
class MatchResult:
    matches: list[LeadMatch] = field(default_factory=list)
    already_matched_job_ids: list[str] = field(default_factory=list)
    unmatched_job_ids: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    # Jobs that no reference matched and whose phone came masked (`138****8888`): they match nobody.
    masked_phone_job_ids: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        by_strategy = {STRATEGY_REFERENCE_ID: 0, STRATEGY_LEGACY_REFERENCE_ID: 0, STRATEGY_PHONE: 0}
        for match in self.matches:
            by_strategy[match.strategy] += 1
        return {
            **by_strategy,
            "already_matched": len(self.already_matched_job_ids),
            "unmatched_jobs": len(self.unmatched_job_ids),
        }


def _unique(values: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v is not None))


def _total_count(raw: object, problems: list[str]) -> int:
    text = clean_text(raw)
    if text is None:
        return 0
    try:
        return max(int(float(text)), 0)
    except ValueError:
        problems.append(f"TotalCount {raw!r} is not a number; taken as 0")
        return 0


def parse_jobs_page(body: dict) -> ParsedPage:
    """Read one ListJobsByGroup body (`resp.body.to_map()`); never raises on a malformed body."""
    problems: list[str] = []
    if not isinstance(body, dict):
        return ParsedPage([], 0, [f"response body is a {type(body).__name__}, not an object"])
    container = body.get("Jobs")
    if container is None:
        return ParsedPage([], 0, ["response has no Jobs"])
    if not isinstance(container, dict):
        return ParsedPage([], 0, [f"response Jobs is a {type(container).__name__}, not an object"])
    total = _total_count(container.get("TotalCount"), problems)
    items = container.get("List")
    if items is None:
        items = []
    elif not isinstance(items, list):
        problems.append(f"response Jobs.List is a {type(items).__name__}, not a list")
        items = []

    jobs: list[JobContacts] = []
    for position, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            problems.append(f"job #{position} on the page is a {type(item).__name__}, not an object")
            continue
        job_id = clean_text(item.get("JobId"))
        if job_id is None:
            problems.append(f"job #{position} on the page has no JobId")
            continue
        contacts = item.get("Contacts")
        if contacts is None:
            contacts = []
        elif not isinstance(contacts, list):
            problems.append(f"job {job_id}: Contacts is a {type(contacts).__name__}, not a list")
            contacts = []
        contacts = [c for c in contacts if isinstance(c, dict)]
        references = [clean_text(item.get("ReferenceId"))]
        references += [clean_text(c.get("ReferenceId")) for c in contacts]
        phones = [clean_text(c.get("PhoneNumber")) for c in contacts]
        jobs.append(JobContacts(job_id, _unique(references), _unique(phones)))
    return ParsedPage(jobs, total, problems, page_size=_echoed_size(container.get("PageSize")), listed=len(items))


def _echoed_size(raw: object) -> int | None:
    text = clean_text(raw)
    try:
        size = int(float(text)) if text is not None else 0
    except ValueError:
        return None
    return size if size > 0 else None


@dataclass
class _Candidate:
    job_id: str
    references: tuple[str, ...]
    phones: tuple[str, ...]
    masked_phone: bool = False


def _prepare_leads(leads: pd.DataFrame, task_id: int) -> pd.DataFrame:
    """One clean row per lead, sorted by id: the order in which duplicates are paired."""
    import pandas as pd

    missing = [c for c in LEAD_COLUMNS if c not in leads.columns]
    if missing and not leads.empty:
        raise ValueError(f"leads frame lacks column(s) {', '.join(missing)}")
    frame = pd.DataFrame(
        {
            "id": pd.to_numeric(leads["id"], errors="coerce") if "id" in leads else pd.Series(dtype=float),
        }
    )
    for column in LEAD_COLUMNS[1:]:
        frame[column] = leads[column].map(clean_text) if column in leads else None
    frame = frame[frame["id"].notna()]
    frame = frame.astype({"id": "int64"}).drop_duplicates("id").sort_values("id", kind="stable")
    frame["legacy"] = frame["leads_id"].map(
        lambda lid: None if lid is None else legacy_reference_id(task_id, lid), na_action="ignore"
    )
    phones = frame["leads_phone"].dropna()
    normalized = {raw: phone_key(raw) for raw in phones.unique()}
    frame["phone"] = frame["leads_phone"].map(normalized, na_action="ignore")
    return frame.reset_index(drop=True)


def _queues(leads: pd.DataFrame, column: str, keys: set[str]) -> dict[str, list[int]]:
    """Lead ids per key, ascending, for only the keys that the jobs carry (vectorised pre-filter)."""
    subset = leads.loc[leads[column].isin(keys), ["id", column]]
    queues: dict[str, list[int]] = {}
    for lead_id, key in zip(subset["id"].tolist(), subset[column].tolist(), strict=True):
        queues.setdefault(key, []).append(lead_id)
    return queues


def _pair(
    candidates: list[_Candidate], queues: dict[str, list[int]], keys_of: str, strategy: str
) -> tuple[list[LeadMatch], list[_Candidate]]:
    """Greedy 1:1 pairing: jobs in page order, each takes the lowest-id free lead among its keys.

    Within one strategy every lead has exactly one key, so each key's queue is consumed front to
    back and a cursor per key is enough; the loop is linear in the jobs' keys, never jobs x leads.
    """
    cursors = dict.fromkeys(queues, 0)
    matches: list[LeadMatch] = []
    left: list[_Candidate] = []
    for candidate in candidates:
        best_key: str | None = None
        best_lead = 0
        for key in getattr(candidate, keys_of):
            queue = queues.get(key)
            if queue is None or cursors[key] >= len(queue):
                continue
            lead_id = queue[cursors[key]]
            if best_key is None or lead_id < best_lead:
                best_key, best_lead = key, lead_id
        if best_key is None:
            left.append(candidate)
            continue
        cursors[best_key] += 1
        matches.append(LeadMatch(int(best_lead), candidate.job_id, strategy))
    return matches, left


def _holders(lead_ids: list[int], job_of_lead: dict[int, str]) -> str:
    shown = [f"lead row {lid} (job {job_of_lead.get(lid, '?')})" for lid in lead_ids[:3]]
    more = f" and {len(lead_ids) - 3} more" if len(lead_ids) > 3 else ""
    return ", ".join(shown) + more


def match_jobs_to_leads(jobs: list[JobContacts], leads: pd.DataFrame, task_id: int) -> MatchResult:
    """Pair one page of jobs with the task's leads (contract: "Matching", "One job, one lead").

    `leads` holds the task's leads_task_list rows with columns id, leads_id, reference_id,
    leads_phone and call_job_id. A job whose reference id names a lead that
    already has a job is reported as a conflict and never falls through to phone matching, because
    an explicit reference is proof of identity and a shared phone number is only a guess.
    """
    import pandas as pd

    frame = _prepare_leads(leads, task_id)
    result = MatchResult()
    job_of_lead: dict[int, str] = {
        int(lid): jid
        for lid, jid in zip(frame["id"].tolist(), frame["call_job_id"].tolist(), strict=True)
        if pd.notna(jid)
    }
    stored_job_ids = set(job_of_lead.values())

    candidates: list[_Candidate] = []
    seen: set[str] = set()
    for position, job in enumerate(jobs, start=1):
        job_id = clean_text(job.job_id)
        if job_id is None:
            result.conflicts.append(f"job #{position} has no JobId; ignored")
            continue
        if job_id in seen:
            result.conflicts.append(f"job {job_id} is listed more than once; only its first entry is used")
            continue
        seen.add(job_id)
        if job_id in stored_job_ids:
            result.already_matched_job_ids.append(job_id)
            continue
        candidates.append(
            _Candidate(
                job_id,
                _unique(clean_text(r) for r in job.reference_ids),
                _unique(phone_key(p) for p in job.phones),
                any(is_masked_phone(p) for p in job.phones),
            )
        )

    free = frame[frame["call_job_id"].isna()]
    for strategy, column, keys_of in (
        (STRATEGY_REFERENCE_ID, "reference_id", "references"),
        (STRATEGY_LEGACY_REFERENCE_ID, "legacy", "references"),
    ):
        keys = {k for c in candidates for k in c.references}
        matches, candidates = _pair(candidates, _queues(free, column, keys), keys_of, strategy)
        result.matches += matches
        job_of_lead.update((m.lead_row_id, m.job_id) for m in matches)
        free = free[~free["id"].isin([m.lead_row_id for m in matches])]

    # A reference id still pointing at one of the task's leads means that lead is taken.
    keys = {k for c in candidates for k in c.references}
    owners = _queues(frame, "reference_id", keys)
    for key, lead_ids in _queues(frame, "legacy", keys).items():
        owners.setdefault(key, []).extend(lead_ids)
    phone_candidates: list[_Candidate] = []
    unmatched: set[str] = set()
    for candidate in candidates:
        claimed = next((k for k in candidate.references if k in owners), None)
        if claimed is None:
            phone_candidates.append(candidate)
            continue
        unmatched.add(candidate.job_id)
        result.conflicts.append(
            f"job {candidate.job_id} carries reference id {claimed!r} of "
            f"{_holders(sorted(owners[claimed]), job_of_lead)}, which already has a job; "
            f"{candidate.job_id} is left unmatched"
        )

    keys = {k for c in phone_candidates for k in c.phones}
    matches, left = _pair(phone_candidates, _queues(free, "phone", keys), "phones", STRATEGY_PHONE)
    result.matches += matches
    job_of_lead.update((m.lead_row_id, m.job_id) for m in matches)

    keys = {k for c in left for k in c.phones}
    phone_owners = _queues(frame, "phone", keys)
    for candidate in left:
        shared = next((k for k in candidate.phones if k in phone_owners), None)
        if shared is not None:
            result.conflicts.append(
                f"job {candidate.job_id}: phone {mask_phone(shared)} belongs only to leads that already "
                f"have a job ({_holders(sorted(phone_owners[shared]), job_of_lead)}); left unmatched"
            )

    result.masked_phone_job_ids = [c.job_id for c in left if c.masked_phone]
    unmatched.update(c.job_id for c in left)
    page_order = dict.fromkeys(clean_text(job.job_id) for job in jobs)
    result.unmatched_job_ids = [job_id for job_id in page_order if job_id in unmatched]
    result.matches.sort(key=lambda m: m.lead_row_id)
    return result
