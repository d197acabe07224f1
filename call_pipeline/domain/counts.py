"""What the steps of a run count, as one typed value that steps hand each other and add up.

Each op returns the counts of its batch; the op after `.collect()` adds them up, and the run
summary and the asset's per-task history are read from the total. Plain data, so it pickles
between processes and machines, and adding two counts is the only way to combine them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

MATCH_STRATEGIES = ("reference_id", "legacy_reference_id", "phone")
MASKED_PHONE_EXAMPLES = 5


@dataclass
class StepCounts:
    jobs_listed: int = 0
    matched_by: Counter = field(default_factory=Counter)  # strategy -> leads newly matched
    already_matched: int = 0
    unmatched_jobs: int = 0
    lost_to_concurrent_run: int = 0
    unmatched_leads_failed: int = 0
    jobs_queried: int = 0
    jobs_not_returned: int = 0
    results_stored: int = 0
    results_not_stored: int = 0
    statuses: Counter = field(default_factory=Counter)  # job status -> results stored this run
    recordings_fetched: int = 0
    recordings_failed: int = 0
    recordings_invalid_task_id: int = 0
    recordings_archived: int = 0
    recordings_already_archived: int = 0
    recording_urls_renewed: int = 0
    recording_bytes_archived: int = 0
    follow_ups_by_verdict: Counter = field(default_factory=Counter)  # is_interested -> follow-ups written
    follow_ups_by_source: Counter = field(default_factory=Counter)  # llm / no_conversation / ai_fallback
    follow_ups_written_elsewhere: int = 0
    follow_ups_failed: int = 0
    batches: int = 0
    pages: int = 0
    batches_caught_up: int = 0
    hot_leads_posted: int = 0
    hot_leads_not_posted: int = 0  # posts that failed (tried again on a later run)
    masked_phone_jobs: int = 0  # jobs whose phone came masked and that nothing else matched
    masked_phone_examples: tuple[str, ...] = ()  # the first few of them (MASKED_PHONE_EXAMPLES)
    units_given_up: int = 0  # units of one lead given up in this run (contract §12)
    jobs_concluded_failed: int = 0  # of which jobs ListJobs no longer returns, concluded Failed

    def __add__(self, other: StepCounts) -> StepCounts:
        total = StepCounts()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(total, f.name, Counter(a) + Counter(b) if isinstance(a, Counter) else a + b)
        total.masked_phone_examples = total.masked_phone_examples[:MASKED_PHONE_EXAMPLES]
        return total

    @classmethod
    def total(cls, parts: list[StepCounts | None]) -> StepCounts:
        result = cls()
        for part in parts:
            if part is not None:
                result = result + part
        return result

    @property
    def follow_ups_written(self) -> int:
        return sum(self.follow_ups_by_verdict.values())

    def summary_stats(self) -> dict:
        """The keys `render_run_summary` reads."""
        return {
            "jobs_listed": self.jobs_listed,
            "match_counts": {**{s: self.matched_by.get(s, 0) for s in MATCH_STRATEGIES},
                             "already_matched": self.already_matched, "unmatched_jobs": self.unmatched_jobs},
            "unmatched_leads_failed": self.unmatched_leads_failed,
            "recordings_fetched": self.recordings_fetched,
            "recordings_failed": self.recordings_failed,
            "recordings_invalid_task_id": self.recordings_invalid_task_id,
            "follow_ups_by_verdict": dict(self.follow_ups_by_verdict),
            "follow_ups_by_source": dict(self.follow_ups_by_source),
            "hot_leads_posted": self.hot_leads_posted,
            "hot_leads_not_posted": self.hot_leads_not_posted,
        }

    def as_metadata(self) -> dict[str, int]:
        """Flat numeric figures, for Dagster metadata (the UI plots numbers per partition)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), int)}
        flat["follow_ups_written"] = self.follow_ups_written
        flat.update({f"matched_by_{s}": self.matched_by.get(s, 0) for s in MATCH_STRATEGIES})
        return flat


@dataclass
class StepReport:
    """A step's counts and the units that failed (each a line saying which and why). Only the
    op's own thread adds to it: worker threads hand their results back."""

    counts: StepCounts = field(default_factory=StepCounts)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def merge(self, other: StepReport) -> None:
        self.counts = self.counts + other.counts
        self.failures.extend(other.failures)

    def failure_message(self, what: str, shown: int = 20) -> str | None:
        if not self.failures:
            return None
        more = f" (+{len(self.failures) - shown} more)" if len(self.failures) > shown else ""
        return (f"{what}: {len(self.failures)} unit(s) failed and will be retried: "
                f"{'; '.join(self.failures[:shown])}{more}")
