"""Measure the shared OutboundBot cap the way the cloud counts it: several processes (each its own
machine's worth: its own state folder) share one Redis and one OUTBOUNDBOT_MAX_QPS, and hammer the
simulator, whose QPS cap is the same number, through the real SDK. Prints, per round, the requests
the simulator throttled, the rate achieved, and the delay between each request's grant (when the
limiter let it go, logged in the client's transport adapter) and its arrival (when the simulator
counted it), matched by the request's x-acs-signature-nonce header.

    .venv/bin/python scripts/shared_qps.py [--processes 2] [--requests 700] [--qps 10] [--rounds 3] \\
        [--jitter-ms 0] [--start-phase 0.99] [--files]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

CHILD = r"""
import json, random, sys, threading, time
from call_pipeline.clients import outboundbot as ob
from call_pipeline.resources import OutboundBotResource

JITTER = float(sys.argv[5]) / 1000
grants = []
current = threading.local()
original_send = ob._GatedAdapter.send

def send(self, request, *args, **kwargs):
    current.nonce = request.headers.get("x-acs-signature-nonce", "")
    return original_send(self, request, *args, **kwargs)

def timed(original_acquire):
    def acquire(self):
        waited = original_acquire(self)
        grants.append((current.nonce, time.time()))  # the grant, as the adapter sees it
        if JITTER:
            time.sleep(random.uniform(0, JITTER))  # a busy machine: work between the grant and the send
        return waited
    return acquire

from call_pipeline.clients.limits import SharedRateLimiter
from call_pipeline.clients.redis_limits import RedisRateLimiter
for limiter_class in (SharedRateLimiter, RedisRateLimiter):
    limiter_class.acquire = timed(limiter_class.acquire)
ob._GatedAdapter.send = send
client = OutboundBotResource(access_key_id="ak", access_key_secret="sk", instance_id="inst",
                             endpoint=sys.argv[1], protocol="http", max_qps=float(sys.argv[2])).get_client()
left = [int(sys.argv[3])]
lock = threading.Lock()

def work():
    while True:
        with lock:
            if left[0] <= 0:
                return
            left[0] -= 1
        client.list_job_groups(1, 10)

threads = [threading.Thread(target=work) for _ in range(int(sys.argv[4]))]
phase = float(sys.argv[6])
if phase >= 0:  # start at this fraction of a wall-clock second, the cloud's counting unit
    time.sleep((phase - time.time()) % 1.0)
started = time.time()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"grants": grants, "started": started, "ended": time.time()}))
"""


def one_round(args: argparse.Namespace, redis_url: str) -> dict:
    from call_pipeline_tools.simulator import outboundbot as sim_ob
    from call_pipeline_tools.simulator.server import _Handler, start_simulator

    arrivals: dict[str, float] = {}
    original, original_dispatch = sim_ob.handle, _Handler._dispatch
    current = threading.local()

    def dispatch(self):
        current.nonce = self.headers.get("x-acs-signature-nonce", "")
        return original_dispatch(self)

    def handle(state, action, params, base_url):
        arrivals[current.nonce] = time.time()  # as the simulator takes its own `now`
        return original(state, action, params, base_url)

    sim_ob.handle, _Handler._dispatch = handle, dispatch
    simulator = start_simulator()
    simulator.state.set_qps_cap(args.qps)
    simulator.state.set_latency(outboundbot_ms=args.latency_ms)
    prefix = f"shared_qps_{uuid.uuid4().hex[:8]}"
    per_process = args.requests // args.processes
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(args.processes):
            if args.files:  # one machine: the processes share the limiter's files, no Redis
                env = {**os.environ, "CALL_PIPELINE_REDIS_URL": "",
                       "CALL_PIPELINE_STATE_DIR": str(Path(tmp) / "machine")}
            else:
                env = {**os.environ, "CALL_PIPELINE_REDIS_URL": redis_url, "CALL_PIPELINE_REDIS_KEY_PREFIX": prefix,
                       "CALL_PIPELINE_STATE_DIR": str(Path(tmp) / f"machine-{i}")}
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, simulator.endpoint, str(args.qps),
                                           str(per_process), str(args.threads), str(args.jitter_ms),
                                           str(args.start_phase)],
                                          stdout=subprocess.PIPE, env=env, text=True))
        outs = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    stats = simulator.state.stats()
    simulator.stop()
    sim_ob.handle, _Handler._dispatch = original, original_dispatch
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"*{prefix}*"):
        client.delete(key)
    grants = [g for out in outs for g in out["grants"]]
    if os.environ.get("SHARED_QPS_DUMP"):
        Path(os.environ["SHARED_QPS_DUMP"]).write_text(json.dumps({"grants": grants, "arrivals": arrivals}))
    delays = sorted(arrivals[n] - t for n, t in grants if n in arrivals)
    def most_in_any_second(times: list[float]) -> int:
        times, best, lo = sorted(times), 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= 1.0:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    started, ended = min(o["started"] for o in outs), max(o["ended"] for o in outs)
    return {"requests": stats["outboundbot_requests"], "throttled": stats["throttled"],
            "achieved_qps": round(stats["outboundbot_requests"] / (ended - started), 2),
            "max_in_a_wall_second": stats["max_requests_per_second"],
            "max_granted_in_any_1s": most_in_any_second([t for _, t in grants]),
            "max_arrived_in_any_1s": most_in_any_second(list(arrivals.values())),
            "grant_to_arrival_ms": {"median": round(1000 * statistics.median(delays), 2),
                                    "p99": round(1000 * delays[int(len(delays) * 0.99)], 2),
                                    "max": round(1000 * delays[-1], 2)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--requests", type=int, default=700)
    p.add_argument("--qps", type=int, default=10)
    p.add_argument("--threads", type=int, default=8, help="threads per process")
    p.add_argument("--latency-ms", type=float, default=20.0, help="the simulator's answer time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--start-phase", type=float, default=-1.0,
                   help="start the requests at this fraction of a wall-clock second (default: at once)")
    p.add_argument("--jitter-ms", type=float, default=0.0,
                   help="a random delay of up to this between each grant and its send (a busy machine)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--files", action="store_true", help="one machine: the file limiter instead of Redis")
    args = p.parse_args()
    for i in range(args.rounds):
        print(json.dumps({"round": i + 1, **one_round(args, args.redis_url)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
