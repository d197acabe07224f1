"""Follow-up writes: one per lead, however they are batched, and never a second one."""

from datetime import datetime

import sqlalchemy as sa

from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import create_crm_engine
from call_pipeline.crm.schema import dcc_leads_follow, leads_task_list
from call_pipeline.domain.followups import FollowUp

NOW = datetime(2026, 11, 28, 10, 0, 0)


def _leads(engine, n):
    with engine.begin() as conn:
        conn.execute(leads_task_list.insert(), [{"task_id": 1, "leads_id": 100 + i, "call_job_id": f"job-{i}",
                                                 "call_status": "Succeeded"} for i in range(n)])
        rows = conn.execute(sa.select(leads_task_list.c.id, leads_task_list.c.leads_id)).all()
    return [repo.LeadForFollowUp(int(r.id), int(r.leads_id), f"job-{i}", "Succeeded", None)
            for i, r in enumerate(rows)]


def _follow_up(verdict: int, remark: str = "备注") -> FollowUp:
    return FollowUp(remark, verdict, None, "llm")


def test_batch_writes_each_lead_once_and_skips_leads_that_have_one(crm_url):
    engine = create_crm_engine(crm_url)
    leads = _leads(engine, 5)
    with engine.connect() as conn:
        first = repo.create_follow_up_on(conn, leads[0], _follow_up(1), NOW)
        ids = repo.create_follow_ups_on(conn, [(lead, _follow_up(i % 3, f"r{i}")) for i, lead in enumerate(leads)]
                                        + [(leads[2], _follow_up(2))], NOW)
    assert first is not None and ids[0] is None and ids[-1] is None  # already had one / twice in the batch
    assert all(ids[1:5]) and len(set(ids[1:5])) == 4
    with engine.connect() as conn:
        linked = dict(conn.execute(sa.select(leads_task_list.c.id, leads_task_list.c.leads_follow_id)).all())
        verdicts = dict(conn.execute(sa.select(leads_task_list.c.id, leads_task_list.c.is_interested)).all())
        follow_ups = conn.execute(sa.select(dcc_leads_follow.c.id, dcc_leads_follow.c.leads_id,
                                            dcc_leads_follow.c.leads_remark)).all()
    assert len(follow_ups) == 5  # one per lead, none orphaned
    assert {fid for fid, _, _ in follow_ups} == set(linked.values())
    assert verdicts[leads[0].lead_row_id] == 1  # the first write is kept
    by_id = {fid: (leads_id, remark) for fid, leads_id, remark in follow_ups}
    for i, lead in enumerate(leads[1:], start=1):
        assert by_id[linked[lead.lead_row_id]] == (lead.leads_id, f"r{i}")
        assert verdicts[lead.lead_row_id] == i % 3
    engine.dispose()
