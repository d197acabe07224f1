"""The scenarios the fault tests run. A scenario has a fixed task id, so that the same job group
(same seed, same JobIds) can be loaded into two simulators: one for the clean run, one for the
run with the fault, each against its own database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import call_tasks, leads_task_list
from call_pipeline_tests.pipeline_harness import ORGANIZATION, new_reference
from call_pipeline_tools.simulator.scenarios import build_job_group

# Leads of the mixed scenario whose transcripts carry a unique marker, so that a DashScope fault
# can target exactly that lead's requests (`match_text`); the stand-in ignores the marker.
MARK_A, MARK_B, MARK_C = 3, 4, 5
MARKERS = {MARK_A: "[[llm:mark_a]]", MARK_B: "[[llm:mark_b]]", MARK_C: "[[llm:mark_c]]"}
INJECTION = 6
GARBAGE = 7
RECORDED = 8  # a Succeeded call with a recording, for DownloadRecording faults aimed at one lead
LEGACY = range(45, 50)
PHONE_ONLY = range(50, 56)
DUP_A, DUP_B = 56, 57
UNMATCHED = 58
FAILED_NO_TASKS = 59
CANCELLED_NO_TRANSCRIPT = 60


@dataclass
class Scenario:
    name: str
    task_id: int
    job_group_id: str
    leads: list[dict]
    group: dict
    # Jobs served from the start; the rest are added later (None: all of them).
    initial_jobs: int | None = None
    notes: dict = field(default_factory=dict)

    @property
    def jobs_by_lead(self) -> dict[int, str]:
        return {int(j["_sim"]["leads_id"]): j["JobId"] for j in self.group["jobs"]
                if j.get("_sim", {}).get("leads_id") is not None}

    def job_of(self, leads_id: int) -> dict:
        return next(j for j in self.group["jobs"] if j.get("_sim", {}).get("leads_id") == leads_id)

    def install(self, crm_url: str, simulator, *, all_jobs: bool = False) -> None:
        """The task and its leads in the CRM (task id fixed), the job group in the simulator."""
        insert_task(crm_url, self.task_id, self.job_group_id, self.leads, name=self.name)
        group = dict(self.group)
        if self.initial_jobs is not None and not all_jobs:
            group["jobs"] = self.group["jobs"][: self.initial_jobs]
        simulator.state.add_job_group(group)

    def late_jobs(self) -> list[dict]:
        return [] if self.initial_jobs is None else self.group["jobs"][self.initial_jobs:]


def insert_task(crm_url: str, task_id: int, job_group_id: str, leads: list[dict], *, name: str = "可靠性测试",
                task_type: int = 2) -> None:
    with get_crm_engine(crm_url).begin() as conn:
        conn.execute(call_tasks.insert().values(
            id=task_id, task_name=name, organization_id=ORGANIZATION, task_type=task_type,
            job_group_id=job_group_id, created_time=datetime(2026, 11, 1), updated_time=datetime(2026, 11, 1)))
        if leads:
            conn.execute(leads_task_list.insert(), [{"task_id": task_id, "organization_id": ORGANIZATION, **lead}
                                                    for lead in leads])


def mixed(task_id: int = 7001, *, n_leads: int = 60, job_group_id: str | None = None, seed: int = 41,
          leads_id_offset: int = 0) -> Scenario:
    """Every matching strategy, duplicate phones, an unmatched lead, each follow-up case, a
    garbage LLM answer and an injection attempt; all jobs terminal, so a clean run ends at 4."""
    job_group_id = job_group_id or f"jg-rel-{task_id}"
    leads, specials = [], {}
    for i in range(1, n_leads + 1):
        leads_id = leads_id_offset + i
        lead = {"leads_id": leads_id, "leads_phone": f"1391234{leads_id:04d}",
                "reference_id": new_reference(task_id, leads_id)}
        if i in LEGACY or i in PHONE_ONLY or i in (DUP_A, DUP_B):
            lead["reference_id"] = None
        if i in (DUP_A, DUP_B):
            lead["leads_phone"] = "138 0013 8000" if i == DUP_A else "+86 138-0013-8000"
        leads.append(lead)
        if i in MARKERS:
            specials[leads_id] = [f"llm:{MARKERS[i][6:-2]}"]
        elif i == INJECTION:
            specials[leads_id] = ["injection"]
        elif i == GARBAGE:
            specials[leads_id] = ["llm:garbage"]
        elif i == RECORDED:
            specials[leads_id] = ["intent:interested_test_drive"]
        elif i in LEGACY:
            specials[leads_id] = ["legacy_reference"]
        elif i in PHONE_ONLY or i in (DUP_A, DUP_B):
            specials[leads_id] = ["no_reference", "phone:plus86_dashed" if i % 2 else "spaced"]
        elif i == UNMATCHED:
            specials[leads_id] = ["skip"]
        elif i == FAILED_NO_TASKS:
            specials[leads_id] = ["status:Failed", "no_tasks"]
        elif i == CANCELLED_NO_TRANSCRIPT:
            specials[leads_id] = ["status:Cancelled", "conversation_absent"]
    group = build_job_group(job_group_id, leads, task_id=task_id, seed=seed, special_cases=specials,
                            status_mix={"Succeeded": 0.6, "Failed": 0.3, "Cancelled": 0.1})
    return Scenario("mixed", task_id, job_group_id, leads, group)


def marked(scenario: Scenario, index: int) -> int:
    """The leads_id of the scenario's lead number `index` (1-based)."""
    return scenario.leads[index - 1]["leads_id"]
