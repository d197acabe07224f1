from call_pipeline.domain.matching import LeadMatch, MatchResult
from call_pipeline.domain.summary import describe_given_up, render_run_summary


def rows(markdown: str) -> dict[str, str]:
    table = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| metric") and "---" not in line:
            label, value = (cell.strip() for cell in line.strip("|").rsplit(" | ", 1))
            table[label] = value
    return table


def test_empty_stats_render_zeros_and_dashes():
    table = rows(render_run_summary({}))
    assert table["jobs listed"] == "0"
    assert table["leads matched by reference_id"] == "0"
    assert table["leads matched by legacy reference id"] == "0"
    assert table["leads matched by phone"] == "0"
    assert table["jobs already matched (kept)"] == "0"
    assert table["unmatched leads marked Failed"] == "0"
    assert table["statuses"] == "—"
    assert table["recordings fetched"] == table["recordings failed"] == "0"
    assert table["follow-ups: interested (1)"] == "0"
    assert table["AI fallbacks"] == "0"
    assert table["task state before"] == table["task state after"] == "—"


def test_full_stats():
    result = MatchResult(
        matches=[LeadMatch(1, "a", "reference_id"), LeadMatch(2, "b", "phone"), LeadMatch(3, "c", "phone")],
        already_matched_job_ids=["d"],
        unmatched_job_ids=["e"],
    )
    stats = {
        "task_id": 42,
        "jobs_listed": 5,
        "match_counts": {**result.counts(), "legacy_reference_id": 2},
        "unmatched_leads_failed": 4,
        "statuses": {"Succeeded": 3, "Failed": 1, "Executing": 2},
        "recordings_fetched": 3,
        "recordings_failed": 1,
        "follow_ups_by_verdict": {0: 2, 1: 1, "2": 1},
        "follow_ups_by_source": {"llm": 2, "no_conversation": 1, "ai_fallback": 1},
        "task_type_before": 2,
        "task_type_after": 3,
    }
    markdown = render_run_summary(stats)
    assert "task 42" in markdown.splitlines()[0]
    table = rows(markdown)
    assert table["jobs listed"] == "5"
    assert table["leads matched by reference_id"] == "1"
    assert table["leads matched by legacy reference id"] == "2"
    assert table["leads matched by phone"] == "2"
    assert table["jobs already matched (kept)"] == "1"
    assert table["jobs left unmatched"] == "1"
    assert table["unmatched leads marked Failed"] == "4"
    assert [k for k in table if k.startswith("status ")] == [
        "status Executing",
        "status Failed",
        "status Succeeded",
    ]
    assert table["status Executing"] == "2"
    assert table["follow-ups: cannot tell (0)"] == "2"
    assert table["follow-ups: not interested (2)"] == "1"
    assert table["follow-ups from AI analysis"] == "2"
    assert table["AI fallbacks"] == "1"
    assert table["task state before"] == "2 (calling)"
    assert table["task state after"] == "3 (calls done)"


def test_pipes_in_status_names_do_not_break_the_table():
    markdown = render_run_summary({"statuses": {"A|B": 1}})
    assert "| status A\\|B | 1 |" in markdown


def test_the_summary_shows_the_job_groups_status():
    assert rows(render_run_summary({"job_group_status": "Paused"}))["job group status"] == "Paused"
    assert rows(render_run_summary({}))["job group status"] == "—"
def test_units_given_up_are_named_with_their_reason():
    line = describe_given_up(42, "job-9", "recording", 5, "OutboundBot DownloadRecording failed: Recording.NotExist")
    assert line == ("lead 42 (job job-9): recording failed in 5 runs, its recording is left empty; "
                    "last error: OutboundBot DownloadRecording failed: Recording.NotExist")
    text = render_run_summary({"task_id": 3, "units_given_up": 1, "given_up": [line]})
    assert "| units of one lead given up | 1 |" in text
    assert "**Given up**" in text and f"- {line}" in text
    assert "Given up" not in render_run_summary({"task_id": 3})  # nothing given up, nothing named
