"""The simulated cloud, in a child process (as the cloud would be: its CPU and memory are not the
pipeline's), holding each seeded task's job group."""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import signal

from call_pipeline_tools.bench.measuring import peak_rss_mib

UNLIMITED_QPS = 1_000_000


# ---- the simulator, in a child process ------------------------------------------------------------


def _serve_simulator(pipe, crm_url: str, task_ids: list[int], shares: dict, seed: int,
                     outboundbot_ms: float, llm_ms: float, qps_cap: int | None) -> None:
    from call_pipeline_tools.simulator.scenarios import build_job_group_from_crm
    from call_pipeline_tools.simulator.server import start_simulator
    from call_pipeline_tools.simulator.state import SimulatorState

    # Ctrl-C reaches the whole process group: the benchmark stops the simulator once it has
    # stopped what uses it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mix = {"Succeeded": shares["succeeded"] + shares["no_transcript"], "Failed": shares["failed"],
           "Cancelled": shares["cancelled"]}
    state = SimulatorState(seed=seed)
    for task_id in task_ids:  # each task its own job group (the task's job_group_id)
        group = build_job_group_from_crm(crm_url, task_id, status_mix={k: v for k, v in mix.items() if v > 0},
                                         seed=seed)
        succeeded = [job for job in group["jobs"] if job["Status"] == "Succeeded" and job.get("Tasks")]
        random.Random(seed).shuffle(succeeded)
        for job in succeeded[:round(shares["no_transcript"] * len(group["jobs"]))]:
            job["Tasks"][-1]["Conversation"] = []
        state.add_job_group(group)
        del group, succeeded
    state.set_latency(outboundbot_ms, llm_ms)
    state.set_qps_cap(qps_cap)
    handle = start_simulator(state=state)
    pipe.send({"endpoint": handle.endpoint, "dashscope_base_url": handle.dashscope_base_url})
    try:
        while True:
            message = pipe.recv()
            if message == "stats":
                stats = state.stats()
                stats.pop("per_second", None)
                stats["peak_rss_mib"] = peak_rss_mib()
                pipe.send(stats)
            elif message == "stop":
                break
    finally:
        handle.stop()


class SimulatorProcess:
    def __init__(self, crm_url: str, task_ids: int | list[int], shares: dict, seed: int, outboundbot_ms: float,
                 llm_ms: float, qps_cap: int | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        task_ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        self._process = context.Process(
            target=_serve_simulator, name="bench-simulator", daemon=True,
            args=(child, crm_url, task_ids, shares, seed, outboundbot_ms, llm_ms, qps_cap))
        self._process.start()
        if not self._pipe.poll(600):
            self.stop()
            raise RuntimeError("the simulator did not start")
        info = self._pipe.recv()
        self.endpoint: str = info["endpoint"]
        self.dashscope_base_url: str = info["dashscope_base_url"]

    def stats(self) -> dict:
        self._pipe.send("stats")
        return self._pipe.recv()

    def inject_fault(self, fault: dict) -> None:
        import requests

        requests.post(f"http://{self.endpoint}/__sim/faults", json=fault, timeout=10,
                      proxies={"http": "", "https": ""}).raise_for_status()

    def stop(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._pipe.send("stop")
            self._process.join(timeout=20)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
