"""The demo, as a user runs it: `call-pipeline demo` in a process of its own, on SQLite."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from call_pipeline.clients.proxies import drop_proxy_variables
from call_pipeline_tools.demo import describe_warnings

JOB_A = "618154ab-0672-4806-86c7-7485332c922c"
JOB_B = "fc6858a2-b14b-43d0-82ce-1eb9d6eb7af1"
JOB_C = "dd18c27c-b0d7-4139-bf41-6af7239dd564"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_warnings_name_leads_and_gather_the_same_warning():
    messages = [f"task 2: job has no call attempts: job {JOB_B}, job {JOB_C}",
                f"task 2: conversation is a str, not a list; not stored: job {JOB_A}",
                "job aaaaaaaa-0000-0000-0000-000000000000: the model's answer was invalid",
                "task 2: 2 lead(s) matched no job and are marked Failed for now"]
    lines = describe_warnings(messages, {JOB_A: 20011, JOB_B: 20010, JOB_C: 20038})
    assert lines[0] == "2 leads 20010, 20038: job has no call attempts"
    assert "lead 20011: conversation is a str, not a list; not stored" in lines
    # a job the CRM does not know keeps a short id, so the warning is never dropped
    assert "lead of job aaaaaaaa: the model's answer was invalid" in lines
    assert "2 lead(s) matched no job and are marked Failed for now" in lines


def test_a_line_that_counts_more_jobs_than_it_names_counts_their_leads():
    lines = describe_warnings([f"task 2: job has no call attempts: job {JOB_B}, job {JOB_C} and 30 more job(s)"],
                              {JOB_B: 20010, JOB_C: 20038})
    assert lines == ["32 leads 20010, 20038 and 30 more: job has no call attempts"]


@pytest.mark.slow  # the whole demo, in a process of its own: tens of seconds
def test_the_demo_tables_add_up_and_its_warnings_follow_them(tmp_path):
    result = subprocess.run([sys.executable, "-m", "call_pipeline.cli", "demo", "--data-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=300, env=drop_proxy_variables())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Every task reached the state the contract says: yes" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("task  leads"))
    titles = re.split(r"\s{2,}", header.strip())
    rows = [dict(zip(titles, line.split(), strict=True)) for line in out.splitlines()
            if re.fullmatch(rf"\s*\d+(\s+\d+){{{len(titles) - 1}}}", line)]
    assert len(rows) == 10  # five tasks, two rounds
    for row in rows:
        assert int(row["matched"]) + int(row["unmatched→Failed"]) + int(row["no job, untouched"]) == \
            int(row["leads"]), row
    # the console shows no run's log lines (nothing failed); the warnings come below the first table
    assert " - WARNING - " not in out + result.stderr and " - INFO - " not in out + result.stderr
    first_table = out.index(header)
    warnings = out.index("Warnings, by task")
    assert warnings > first_table
    section = out[warnings:out.index("Round 2")]
    assert "task 2 (老客户回访" in section
    assert "neither a reference id nor a phone" in section and "job has no call attempts" in section
    assert not UUID.search(section), section
