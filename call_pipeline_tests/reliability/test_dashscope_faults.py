"""DashScope faults, each aimed at one lead's requests (its transcript carries a marker): 429 and
500 are retried by our LLM client (3 attempts, exponential backoff); past the retries (and timeouts
past the retries) they are an outage of the service, no verdict on the lead (contract §12): its unit
fails, no follow-up is written, and the next run asks again. `DataInspectionFailed` (never retried)
and a non-JSON answer are the lead's own failures: the lead gets the AI-fallback follow-up
(is_interested 0, "AI分析不可用…"), the basic record, so those leads are compared with the fallback,
every other lead with the clean run's verdict."""

from __future__ import annotations

import json

from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import FAULT_RUNS_EXECUTOR, event_messages, settle
from call_pipeline_tests.reliability.invariant import Monitor, assert_matches_clean_run, normalized
from call_pipeline_tests.reliability.scenarios import MARK_A, MARK_B, MARK_C, MARKERS


def requests_for(simulator, leads_id: int) -> int:
    marker = MARKERS[leads_id]
    return sum(marker in json.dumps(body, ensure_ascii=False) for body in simulator.state.llm_requests)


def prepare(mariadb_url, simulator, clean_run):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    return scenario, clean


def settle_checked(mariadb_url, instance, scenario):
    with Monitor(mariadb_url, [scenario.task_id]):
        return settle(instance, mariadb_url, scenario.task_id, executor=FAULT_RUNS_EXECUTOR)


def test_throttling_and_server_errors_within_the_retries_change_nothing(mariadb_url, simulator, instance, env,
                                                                          clean_run):
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action="dashscope", status=429, code="Throttling.RateQuota", times=2,
                                 match_text=MARKERS[MARK_A])
    simulator.state.inject_fault(action="dashscope", status=500, code="InternalError", times=2,
                                 match_text=MARKERS[MARK_B])

    settled = settle_checked(mariadb_url, instance, scenario)

    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert settled.attempts[0].success
    assert requests_for(simulator, MARK_A) == 3 and requests_for(simulator, MARK_B) == 3


def test_errors_past_the_retries_are_an_outage_asked_again(mariadb_url, simulator, instance, env, clean_run):
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action="dashscope", status=500, code="InternalError", times=3,
                                 match_text=MARKERS[MARK_A])
    simulator.state.inject_fault(action="dashscope", status=429, code="Throttling.RateQuota", times=3,
                                 match_text=MARKERS[MARK_B])

    settled = settle_checked(mariadb_url, instance, scenario)

    # an outage past the retries is no verdict: the step fails, its retry (or a later run) asks
    # again and writes the clean run's verdict
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert requests_for(simulator, MARK_A) == 4 and requests_for(simulator, MARK_B) == 4
    messages = "\n".join(event_messages(instance, settled.run_ids))
    for leads_id, code in ((MARK_A, "InternalError"), (MARK_B, "Throttling.RateQuota")):
        job_id = scenario.jobs_by_lead[leads_id]
        assert f"job {job_id}: follow-up not written (retried next run): LLM outage ({code})" in messages


def test_data_inspection_failed_is_not_retried(mariadb_url, simulator, instance, env, clean_run):
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action="dashscope", status=400, code="DataInspectionFailed", times=1,
                                 match_text=MARKERS[MARK_B])

    settled = settle_checked(mariadb_url, instance, scenario)

    # not retried: the basic AI-fallback record at once
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean, expect_fallback={MARK_B})
    assert requests_for(simulator, MARK_B) == 1
    assert "DataInspectionFailed" in "\n".join(event_messages(instance, settled.run_ids))


def test_timeouts_are_retried_and_past_the_retries_asked_again(mariadb_url, simulator, instance, env, clean_run):
    env(llm_timeout_s=0.5)
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action="dashscope", latency_ms=1200, times=1, match_text=MARKERS[MARK_C])
    simulator.state.inject_fault(action="dashscope", latency_ms=1200, times=3, match_text=MARKERS[MARK_A])

    settled = settle_checked(mariadb_url, instance, scenario)

    # MARK_C: one timeout, then an answer; MARK_A: timed out on every attempt of the first run →
    # an outage, no verdict; asked again later, it gets the clean run's verdict
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert requests_for(simulator, MARK_C) == 2 and requests_for(simulator, MARK_A) == 4
    assert "LLM outage (Timeout)" in "\n".join(event_messages(instance, settled.run_ids))


def test_an_answer_that_is_not_json_gives_the_ai_fallback(mariadb_url, simulator, instance, env, clean_run):
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action="dashscope", llm_content="好的，我来分析一下这通电话：客户很有兴趣。",
                                 times=1, match_text=MARKERS[MARK_C])

    settled = settle_checked(mariadb_url, instance, scenario)

    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean, expect_fallback={MARK_C})
    assert requests_for(simulator, MARK_C) == 1  # an invalid answer is not asked again
    job_id = scenario.jobs_by_lead[MARK_C]
    assert any(f"job {job_id}: the model's answer was invalid (answer is not JSON" in m
               for m in event_messages(instance, settled.run_ids))
