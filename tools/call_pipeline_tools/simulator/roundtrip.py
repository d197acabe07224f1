"""Prints the simulator's median round trip at zero latency, through the real SDKs.

    python -m call_pipeline_tools.simulator.roundtrip [N]

A sanity figure, not a test: a well-behaved keep-alive server answers in about a millisecond here;
a naive http.server (Nagle + delayed ACK) would show ~40 ms.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from call_pipeline_tools.simulator import scenarios
from call_pipeline_tools.simulator.server import start_simulator


def _median_ms(fn: Callable[[], object], n: int) -> float:
    fn()  # warm-up: opens the pooled keep-alive connection
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    import dashscope
    import requests
    from alibabacloud_outboundbot20191226 import models as ob
    from alibabacloud_outboundbot20191226.client import Client
    from alibabacloud_tea_openapi import models as open_api_models

    n = int((argv if argv is not None else sys.argv[1:] or ["200"])[0])
    from call_pipeline.clients.proxies import drop_proxy_variables

    drop_proxy_variables()
    with start_simulator() as sim:
        group = scenarios.build_demo_job_group("jg-rt", 100)
        sim.state.add_job_group(group)
        job_id = group["jobs"][0]["JobId"]
        client = Client(open_api_models.Config(access_key_id="fakeAK", access_key_secret="fakeSK",
                                               endpoint=sim.endpoint, protocol="http"))
        session = requests.Session()
        msgs = [{"role": "user", "content": "客户: 这车价格多少？请输出 json"}]
        results = {
            "raw HTTP ListJobs via requests (1 id)":
                lambda: session.post(f"{sim.url}/?JobId.1={job_id}", headers={"x-acs-action": "ListJobs"}),
            "SDK ListJobs (1 id)":
                lambda: client.list_jobs(ob.ListJobsRequest(instance_id="i", job_id=[job_id])),
            "SDK ListJobsByGroup (page of 10)":
                lambda: client.list_jobs_by_group(ob.ListJobsByGroupRequest(
                    instance_id="i", job_group_id="jg-rt", page_number=1, page_size=10)),
            "SDK Generation.call":
                lambda: dashscope.Generation.call(model="qwen-plus", messages=msgs, result_format="message",
                                                  api_key="sk-test", base_address=sim.dashscope_base_url),
        }
        for label, fn in results.items():
            print(f"{label:55s} median {_median_ms(fn, n):6.2f} ms over {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
