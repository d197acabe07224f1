import math

import pandas as pd
import pytest

from call_pipeline.domain.matching import (
    JobContacts,
    LeadMatch,
    MatchResult,
    ParsedPage,
    legacy_reference_id,
    match_jobs_to_leads,
    parse_jobs_page,
)

TASK = 7


def lead(row_id, leads_id=None, reference_id=None, phone=None, job=None):
    return {
        "id": row_id,
        "leads_id": leads_id if leads_id is not None else row_id * 10,
        "reference_id": reference_id,
        "leads_phone": phone,
        "call_job_id": job,
    }


def frame(*rows):
    return pd.DataFrame(list(rows), columns=["id", "leads_id", "reference_id", "leads_phone", "call_job_id"])


def job(job_id, refs=(), phones=()):
    return JobContacts(job_id, tuple(refs), tuple(phones))


def pairs(result: MatchResult):
    return [(m.lead_row_id, m.job_id, m.strategy) for m in result.matches]


# --- parse_jobs_page ---------------------------------------------------------------------------


SERVED_PAGE = {
    "RequestId": "REQ-1",
    "Success": True,
    "Jobs": {
        "TotalCount": 2,
        "PageNumber": 1,
        "PageSize": 2,
        "List": [
            {
                "JobId": "job-1",
                "ReferenceId": "ref-1",
                "Contacts": [{"ContactId": "c-1", "PhoneNumber": "13800000001", "ReferenceId": "ref-1"}],
            },
            {
                "JobId": "job-2",
                "Status": "Failed",
                "Contacts": [{"ContactId": "c-2", "PhoneNumber": "13800000002", "ReferenceId": "ref-2"}],
            },
        ],
    },
}


def test_parse_jobs_page_reads_the_served_example():
    page = parse_jobs_page(SERVED_PAGE)
    assert isinstance(page, ParsedPage)
    assert page.total_count == 2
    assert page.problems == []
    assert page.jobs == [
        JobContacts("job-1", ("ref-1",), ("13800000001",)),
        JobContacts("job-2", ("ref-2",), ("13800000002",)),
    ]


def test_parse_jobs_page_job_level_reference_counts_and_contacts_add_more():
    body = {
        "Jobs": {
            "TotalCount": "3",
            "List": [
                {
                    "JobId": 42,
                    "ReferenceId": "job-ref",
                    "Contacts": [
                        {"ReferenceId": "c-ref", "PhoneNumber": "+86 138 0000 0001"},
                        {"ReferenceId": "", "PhoneNumber": None},
                        "not a contact",
                    ],
                }
            ],
        }
    }
    page = parse_jobs_page(body)
    assert page.total_count == 3
    assert page.jobs == [JobContacts("42", ("job-ref", "c-ref"), ("+86 138 0000 0001",))]


def test_parse_jobs_page_drops_and_reports_a_job_without_job_id():
    body = {
        "Jobs": {"TotalCount": 3, "List": [{"JobId": "a"}, {"JobId": "b"}, {"JobId": ""}, {"Contacts": []}]}
    }
    page = parse_jobs_page(body)
    assert [j.job_id for j in page.jobs] == ["a", "b"]
    assert page.problems == ["job #3 on the page has no JobId", "job #4 on the page has no JobId"]


def test_parse_jobs_page_job_without_contacts():
    page = parse_jobs_page({"Jobs": {"TotalCount": 1, "List": [{"JobId": "a", "Contacts": []}]}})
    assert page.jobs == [JobContacts("a", (), ())]
    page = parse_jobs_page({"Jobs": {"TotalCount": 1, "List": [{"JobId": "a", "Contacts": "x"}]}})
    assert page.jobs == [JobContacts("a", (), ())]
    assert "Contacts is a str" in page.problems[0]


@pytest.mark.parametrize(
    ("total", "expected"), [(None, 0), ("", 0), ("12", 12), (12, 12), ("abc", 0), (12.0, 12)]
)
def test_parse_jobs_page_total_count_is_tolerant(total, expected):
    assert parse_jobs_page({"Jobs": {"TotalCount": total, "List": []}}).total_count == expected


@pytest.mark.parametrize("body", [{}, {"Jobs": None}, {"Jobs": []}, {"Jobs": {"List": "x"}}, None])
def test_parse_jobs_page_malformed_bodies_give_no_jobs_and_a_reason(body):
    page = parse_jobs_page(body)
    assert page.jobs == []
    assert page.total_count == 0
    assert page.problems


# --- match_jobs_to_leads: the strategies --------------------------------------------------------


def test_legacy_reference_id():
    assert legacy_reference_id(12, 345) == "task_12_lead_345"


def test_strategy_1_reference_id():
    leads = frame(lead(1, reference_id="7001"), lead(2, reference_id="7002"))
    result = match_jobs_to_leads([job("j2", refs=["7002"]), job("j1", refs=["7001"])], leads, TASK)
    assert pairs(result) == [(1, "j1", "reference_id"), (2, "j2", "reference_id")]
    assert result.unmatched_job_ids == []


def test_strategy_2_legacy_reference_applies_to_every_lead():
    leads = frame(lead(1, leads_id=501), lead(2, leads_id=502, reference_id="something-else"))
    jobs = [job("j1", refs=["task_7_lead_501"]), job("j2", refs=["task_7_lead_502"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "j1", "legacy_reference_id"), (2, "j2", "legacy_reference_id")]


def test_strategy_3_phone_after_normalising_both_sides():
    leads = frame(
        lead(1, phone="138 0000 0001"),
        lead(2, phone="+86-138-0000-0002"),
        lead(3, phone="0086 13800000003"),
        lead(4, phone="(138)00000004"),
    )
    jobs = [
        job("j1", phones=["+8613800000001"]),
        job("j2", phones=["13800000002"]),
        job("j3", phones=["86 138 0000 0003"]),
        job("j4", phones=["0086-138-0000-0004"]),
    ]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(i, f"j{i}", "phone") for i in range(1, 5)]


def test_priority_reference_beats_legacy_beats_phone():
    leads = frame(
        lead(1, leads_id=100, reference_id="R1", phone="13800000001"),
        lead(2, leads_id=200, phone="13800000001"),
        lead(3, leads_id=300, phone="13800000001"),
    )
    jobs = [
        job("by-phone", phones=["13800000001"]),
        job("by-legacy", refs=["task_7_lead_200"], phones=["13800000001"]),
        job("by-ref", refs=["R1"], phones=["13800000001"]),
    ]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [
        (1, "by-ref", "reference_id"),
        (2, "by-legacy", "legacy_reference_id"),
        (3, "by-phone", "phone"),
    ]
    assert result.counts() == {
        "reference_id": 1,
        "legacy_reference_id": 1,
        "phone": 1,
        "already_matched": 0,
        "unmatched_jobs": 0,
    }


def test_job_matching_by_reference_and_by_phone_is_matched_once():
    leads = frame(lead(1, reference_id="R1", phone="13800000001"), lead(2, phone="13800000001"))
    result = match_jobs_to_leads([job("j1", refs=["R1"], phones=["13800000001"])], leads, TASK)
    assert pairs(result) == [(1, "j1", "reference_id")]
    assert result.unmatched_job_ids == []


def test_lead_matched_by_reference_is_not_offered_to_phone_matching():
    leads = frame(lead(1, reference_id="R1", phone="13800000001"))
    jobs = [job("j-phone", phones=["13800000001"]), job("j-ref", refs=["R1"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "j-ref", "reference_id")]
    assert result.unmatched_job_ids == ["j-phone"]


# --- one job, one lead -------------------------------------------------------------------------


def test_duplicate_phones_are_paired_one_to_one_by_lead_id_and_job_order():
    leads = frame(
        lead(30, phone="13800000001"),
        lead(10, phone="138-0000-0001"),
        lead(20, phone="+86 13800000001"),
    )
    jobs = [job("first", phones=["13800000001"]), job("second", phones=["13800000001"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(10, "first", "phone"), (20, "second", "phone")]
    # Lead 30 waits for a later page; no job was given twice.
    assert len({m.job_id for m in result.matches}) == len(result.matches)


def test_surplus_jobs_on_a_shared_phone_stay_unmatched_and_listed():
    leads = frame(lead(1, phone="13800000001"))
    jobs = [job("a", phones=["13800000001"]), job("b", phones=["13800000001"]), job("c", phones=["139"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "a", "phone")]
    assert result.unmatched_job_ids == ["b", "c"]
    assert any("job b" in c and "138****0001" in c for c in result.conflicts)


def test_pairing_is_stable_whatever_the_frame_order():
    rows = [lead(i, phone="13800000001") for i in (5, 3, 9, 1)]
    jobs = [job(f"j{i}", phones=["13800000001"]) for i in range(3)]
    first = match_jobs_to_leads(jobs, frame(*rows), TASK)
    second = match_jobs_to_leads(jobs, frame(*reversed(rows)), TASK)
    assert pairs(first) == pairs(second) == [(1, "j0", "phone"), (3, "j1", "phone"), (5, "j2", "phone")]


def test_two_jobs_with_the_same_reference_id_second_left_unmatched():
    leads = frame(lead(1, reference_id="R1", phone="13800000001"), lead(2, phone="13800000001"))
    jobs = [job("j1", refs=["R1"], phones=["13800000001"]), job("j2", refs=["R1"], phones=["13800000001"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "j1", "reference_id")]
    # The reference id names lead 1, so j2 does not fall through to lead 2 by phone.
    assert result.unmatched_job_ids == ["j2"]
    assert len(result.conflicts) == 1
    assert (
        "j2" in result.conflicts[0] and "'R1'" in result.conflicts[0] and "lead row 1" in result.conflicts[0]
    )


def test_job_carrying_several_keys_takes_the_lowest_free_lead():
    leads = frame(lead(2, phone="13800000002"), lead(3, phone="13800000002"), lead(1, phone="13800000001"))
    jobs = [job("multi", phones=["13800000002", "13800000001"]), job("two", phones=["13800000002"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "multi", "phone"), (2, "two", "phone")]


def test_duplicate_job_ids_on_a_page_are_used_once():
    leads = frame(lead(1, phone="13800000001"), lead(2, phone="13800000001"))
    jobs = [job("j1", phones=["13800000001"]), job("j1", phones=["13800000001"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "j1", "phone")]
    assert any("more than once" in c for c in result.conflicts)


# --- already stored jobs -------------------------------------------------------------------------


def test_job_already_stored_on_a_lead_is_kept_whatever_else_it_carries():
    leads = frame(lead(1, reference_id="R1", job="j1"), lead(2, reference_id="R2"))
    result = match_jobs_to_leads([job("j1", refs=["R2"], phones=["13800000001"])], leads, TASK)
    assert result.matches == []
    assert result.already_matched_job_ids == ["j1"]
    assert result.unmatched_job_ids == []
    assert result.counts()["already_matched"] == 1


def test_lead_with_a_call_job_id_is_never_matched_again():
    leads = frame(lead(1, reference_id="R1", phone="13800000001", job="old"), lead(2, phone="13800000001"))
    result = match_jobs_to_leads([job("new", phones=["13800000001"])], leads, TASK)
    assert pairs(result) == [(2, "new", "phone")]
    result = match_jobs_to_leads([job("new", refs=["R1"])], leads, TASK)
    assert result.matches == []
    assert result.unmatched_job_ids == ["new"]


@pytest.mark.parametrize("empty", [None, math.nan, "", "  "])
def test_empty_call_job_id_means_no_job(empty):
    leads = frame(lead(1, reference_id="R1", job=empty))
    assert pairs(match_jobs_to_leads([job("j1", refs=["R1"])], leads, TASK)) == [(1, "j1", "reference_id")]


# --- empty keys never match ----------------------------------------------------------------------


@pytest.mark.parametrize("empty", [None, math.nan, "", "   "])
def test_empty_reference_ids_and_phones_never_match(empty):
    leads = frame(lead(1, leads_id=99, reference_id=empty, phone=empty))
    jobs = [job("j1", refs=[empty, ""] if isinstance(empty, str) else [""], phones=["", " ", "--"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert result.matches == []
    assert result.unmatched_job_ids == ["j1"]


def test_job_with_no_contacts_is_unmatched():
    leads = frame(lead(1, reference_id="R1", phone="13800000001"))
    result = match_jobs_to_leads([job("bare")], leads, TASK)
    assert result.matches == []
    assert result.unmatched_job_ids == ["bare"]
    assert result.conflicts == []


def test_reference_ids_are_compared_after_stripping_and_numeric_columns_work():
    leads = pd.DataFrame(
        {
            "id": [1, 2],
            "leads_id": [10.0, 20.0],
            "reference_id": [7001, None],
            "leads_phone": [None, None],
            "call_job_id": [None, None],
        }
    )
    jobs = [job("a", refs=[" 7001 "]), job("b", refs=["task_7_lead_20"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "a", "reference_id"), (2, "b", "legacy_reference_id")]


def test_no_leads_or_no_jobs():
    assert match_jobs_to_leads([], frame(lead(1, phone="13800000001")), TASK) == MatchResult()
    result = match_jobs_to_leads([job("j1", phones=["13800000001"])], frame(), TASK)
    assert result.unmatched_job_ids == ["j1"]
    assert match_jobs_to_leads([job("j1")], pd.DataFrame(), TASK).unmatched_job_ids == ["j1"]


def test_missing_lead_columns_are_a_clear_error():
    with pytest.raises(ValueError, match="call_job_id"):
        match_jobs_to_leads(
            [],
            pd.DataFrame({"id": [1], "leads_id": [1], "reference_id": [None], "leads_phone": [None]}),
            TASK,
        )


def test_results_are_plain_python_values_sorted_by_lead():
    leads = frame(lead(3, reference_id="c"), lead(1, reference_id="a"), lead(2, reference_id="b"))
    result = match_jobs_to_leads(
        [job("x", refs=["c"]), job("y", refs=["a"]), job("z", refs=["b"])], leads, TASK
    )
    assert [m.lead_row_id for m in result.matches] == [1, 2, 3]
    assert all(type(m.lead_row_id) is int and type(m.job_id) is str for m in result.matches)
    assert result.matches[0] == LeadMatch(1, "y", "reference_id")


def test_parse_then_match_end_to_end():
    leads = frame(lead(1, reference_id="ref-1"), lead(2, phone="+86 138 0000 0002"), lead(3, phone="139"))
    result = match_jobs_to_leads(parse_jobs_page(SERVED_PAGE).jobs, leads, TASK)
    # job-2 carries ref-2, which names none of this task's leads, so phone matching may use it.
    assert pairs(result) == [(1, "job-1", "reference_id"), (2, "job-2", "phone")]


# --- scale -------------------------------------------------------------------------------------


def test_ten_thousand_leads_against_a_page_of_one_hundred_jobs():
    n = 10_000
    leads = pd.DataFrame(
        {
            "id": range(1, n + 1),
            "leads_id": range(100_001, 100_001 + n),
            "reference_id": [f"7{i}" if i % 3 == 0 else None for i in range(n)],
            # Every tenth phone is shared by ten leads, to exercise the 1:1 pairing at scale.
            "leads_phone": [f"+86 139{i // 10 if i % 10 == 0 else i:08d}" for i in range(n)],
            "call_job_id": [f"old-{i}" if i % 7 == 0 else None for i in range(n)],
        }
    )
    jobs = []
    for k in range(100):
        i = k * 97
        if k % 3 == 0:
            jobs.append(job(f"j{k}", refs=[f"7{i}"], phones=[f"139{i:08d}"]))
        elif k % 3 == 1:
            jobs.append(job(f"j{k}", refs=[f"task_{TASK}_lead_{100_001 + i}"]))
        else:
            jobs.append(job(f"j{k}", phones=[f"139{i:08d}"]))
    jobs.append(job("old-14"))
    result = match_jobs_to_leads(jobs, leads, TASK)
    counts = result.counts()
    assert counts["already_matched"] == 1
    assert sum(counts.values()) == len(jobs)
    assert len({m.job_id for m in result.matches}) == len(result.matches)
    assert len({m.lead_row_id for m in result.matches}) == len(result.matches)


def test_a_masked_phone_matches_nobody_never_as_its_digits():
    leads = frame(
        lead(1, phone="1388888"),  # the masked number's digits
        lead(2, phone="138****8888"),  # a masked number in the CRM too
        lead(3, phone="13800008888"),
    )
    jobs = [job("j-masked", phones=["138****8888"]), job("j-plain", phones=["13800008888"]),
            job("j-masked-ref", refs=[], phones=["+86 139＊＊＊＊0000"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(3, "j-plain", "phone")]
    assert result.unmatched_job_ids == ["j-masked", "j-masked-ref"]
    assert result.masked_phone_job_ids == ["j-masked", "j-masked-ref"]


def test_a_masked_phone_beside_a_reference_or_a_real_phone_is_not_reported():
    leads = frame(lead(1, reference_id="r1"), lead(2, phone="13700000002"))
    jobs = [job("j1", refs=["r1"], phones=["138****8888"]), job("j2", phones=["137****0002", "13700000002"])]
    result = match_jobs_to_leads(jobs, leads, TASK)
    assert pairs(result) == [(1, "j1", "reference_id"), (2, "j2", "phone")]
    assert result.masked_phone_job_ids == []
