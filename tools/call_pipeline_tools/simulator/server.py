"""The simulator's HTTP server: one port serving OutboundBot, DashScope and the control plane.

The unmodified SDKs talk to it: ``alibabacloud_outboundbot20191226`` with
``Config(endpoint=handle.endpoint, protocol="http")`` and ``dashscope`` with
``base_address=handle.dashscope_base_url`` (or ``dashscope.base_http_api_url``). Requests are routed
by path: ``/__sim/*`` to the control plane below, ``/__recordings/*`` and anything with an
``x-acs-action`` header or ``Action`` query parameter to ``outboundbot``, the DashScope paths to
``dashscope``. What they all answer from is one ``SimulatorState`` (``state``).

Control plane (JSON over HTTP; each also a method of ``SimulatorState``):

=====================================  ==========================================================
``POST   /__sim/faults``               inject a fault (body: one fault dict, or a list) → ``inject_fault``
``GET    /__sim/faults``               pending faults
``DELETE /__sim/faults``               clear faults → ``clear_faults``
``POST   /__sim/latency``              ``{"outboundbot_ms": 30, "dashscope_ms": 500}`` → ``set_latency``
``POST   /__sim/qps``                  ``{"cap": 50}`` (null: no cap) → ``set_qps_cap``
``POST   /__sim/page_size_cap``        ``{"cap": 50, "from_page": 1}`` (null: no cap) → ``set_page_size_cap``
``GET    /__sim/stats``                counters → ``stats``
``POST   /__sim/reset_stats``          → ``reset_stats``
``POST   /__sim/job_groups``           a job group dict, or ``{"job_groups": [...]}`` → ``add_job_group``
``GET    /__sim/job_groups``           ids and job counts of the loaded groups
``POST   /__sim/jobs``                 ``{"job_group_id": .., "jobs": [...]}`` (late jobs) → ``add_jobs``
``POST   /__sim/advance``              ``{"job_group_id": .., "steps": 1, "job_ids": null}`` → ``advance``
``POST   /__sim/jobs_gone``            ``{"job_ids": [...]}``: ListJobs omits them ([] brings them back)
``POST   /__sim/job_status``           ``{"job_id": .., "status": .., ...}`` → ``set_job_status``
``POST   /__sim/job_group_status``     ``{"job_group_id": .., "status": "Paused"}`` (null: follow the jobs again)
                                      → ``set_job_group_status``
``POST   /__sim/late_transcripts``     ``{"job_ids": [..]}``: their late transcripts now → ``release_late_transcripts``
``GET    /__sim/jobs/<JobId>``         one job as loaded → ``get_job``
``GET    /__sim/llm_requests``         DashScope request bodies received → ``llm_requests``
``POST   /__sim/reset``                forget everything (groups, faults, latency, cap, stats) → ``reset``
``GET    /__sim/health``               ``{"ok": true}``
=====================================  ==========================================================

The fault dict's keys and what the QPS cap counts: see ``state``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from call_pipeline_tools.simulator import dashscope, outboundbot
from call_pipeline_tools.simulator.state import SimulatorState
from call_pipeline_tools.simulator.wire import SimResponse, dumps


def _control(state: SimulatorState, method: str, path: str, body: Any) -> tuple[int, Any]:
    """One control-plane request (the table above): its status and JSON payload."""
    b = body if isinstance(body, dict) else {}
    route = (method, path.rstrip("/"))
    if route == ("GET", "/__sim/health"):
        return 200, {"ok": True}
    if route == ("POST", "/__sim/faults"):
        faults = body if isinstance(body, list) else [b]
        return 200, {"ok": True, "faults": [state.inject_fault(**f) for f in faults]}
    if route == ("GET", "/__sim/faults"):
        return 200, {"faults": state.faults}
    if route == ("DELETE", "/__sim/faults"):
        state.clear_faults()
        return 200, {"ok": True}
    if route == ("POST", "/__sim/latency"):
        state.set_latency(b.get("outboundbot_ms"), b.get("dashscope_ms"))
        return 200, {"ok": True, "outboundbot_ms": state.outboundbot_latency_ms,
                     "dashscope_ms": state.dashscope_latency_ms}
    if route == ("POST", "/__sim/qps"):
        state.set_qps_cap(b.get("cap"))
        return 200, {"ok": True, "cap": state.qps_cap}
    if route == ("POST", "/__sim/page_size_cap"):
        state.set_page_size_cap(b.get("cap"), int(b.get("from_page") or 1))
        return 200, {"ok": True, "page_size_cap": state.page_size_cap}
    if route == ("GET", "/__sim/stats"):
        return 200, state.stats()
    if route == ("POST", "/__sim/reset_stats"):
        state.reset_stats()
        return 200, {"ok": True}
    if route == ("POST", "/__sim/reset"):
        state.reset()
        return 200, {"ok": True}
    if route == ("POST", "/__sim/job_groups"):
        return 200, {"ok": True, "job_group_ids": state.load_scenario(body)}
    if route == ("GET", "/__sim/job_groups"):
        return 200, {"job_groups": [{"JobGroupId": g, "jobs": len(state.jobs_of_group(g))}
                                    for g in state.job_group_ids()]}
    if route == ("POST", "/__sim/jobs"):
        return 200, {"ok": True, "added": state.add_jobs(b["job_group_id"], b.get("jobs", []))}
    if route == ("POST", "/__sim/advance"):
        return 200, {"ok": True, **state.advance(b["job_group_id"], int(b.get("steps", 1)), b.get("job_ids"))}
    if route == ("POST", "/__sim/job_status"):
        job = state.set_job_status(b["job_id"], b["status"], failure_reason=b.get("failure_reason"),
                                   tasks=b.get("tasks"), conversation=b.get("conversation"))
        return 200, {"ok": True, "job": job}
    if route == ("POST", "/__sim/job_group_status"):
        return 200, {"ok": True, "status": state.set_job_group_status(b["job_group_id"], b.get("status"))}
    if route == ("POST", "/__sim/late_transcripts"):
        return 200, {"ok": True, "released": state.release_late_transcripts(b.get("job_ids") or [])}
    if route == ("POST", "/__sim/jobs_gone"):
        return 200, {"ok": True, "job_ids": state.set_jobs_gone(b.get("job_ids") or [])}
    if route == ("GET", "/__sim/llm_requests"):
        return 200, {"llm_requests": state.llm_requests}
    if route[1].startswith("/__sim/jobs/") and method == "GET":
        job = state.get_job(route[1].rsplit("/", 1)[1])
        return (200, job) if job is not None else (404, {"ok": False, "error": "unknown job"})
    return 404, {"ok": False, "error": f"no control endpoint {method} {path}"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: both SDKs pool connections
    server_version = "CallPipelineSimulator/1.0"
    # TCP_NODELAY on the accepted socket (StreamRequestHandler.setup); without it, Nagle plus the
    # client's delayed ACK adds ~40 ms to every keep-alive round trip.
    disable_nagle_algorithm = True
    server: SimulatorHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def parse_request(self) -> bool:
        # When the request arrived (wall clock, monotonic): as soon as its request line is read,
        # before its headers, its body and the state's lock, whose waits would stamp it late.
        self.arrived = (time.time(), time.monotonic())
        return super().parse_request()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request logging
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        try:
            raw = self._read_body()
            resp = self._route(raw)
        except Exception as exc:  # a simulator bug must still answer, or the client hangs to its timeout
            resp = SimResponse(500, outboundbot.error_body("InternalError", f"simulator error: {exc!r}"))
        self._send(resp)

    def _route(self, raw: bytes) -> SimResponse:
        state = self.server.state
        parts = urlsplit(self.path)
        path = parts.path or "/"
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if path.startswith("/__sim/"):
            try:
                body = json.loads(raw) if raw.strip() else {}
                status, payload = _control(state, self.command, path, body)
            except (ValueError, KeyError, TypeError) as e:
                status, payload = 400, {"ok": False, "error": f"{type(e).__name__}: {e}"}
            return SimResponse(status, dumps(payload))
        if path.startswith("/__recordings/"):
            name = path[len("/__recordings/"):]
            return outboundbot.recording(state, name[:-4] if name.endswith((".wav", ".mp3")) else name, query)
        endpoint = dashscope.endpoint_of(path)
        if endpoint is not None:
            return dashscope.handle(state, endpoint, self.headers, raw)
        action = self.headers.get("x-acs-action") or query.get("Action")
        if action:
            return outboundbot.handle(state, action, query, self._base_url(), self.arrived)
        if path == "/":
            return SimResponse(404, outboundbot.error_body("InvalidAction.NotFound", "No action given "
                                                           "(x-acs-action header or Action query parameter)."))
        return SimResponse(404, outboundbot.error_body("InvalidApi.NotFound", f"No such path: {path}"))

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        if host and "://" not in host:
            return f"http://{host}"
        return self.server.url

    def _send(self, resp: SimResponse) -> None:
        try:
            reason = HTTPStatus(resp.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {resp.status} {reason}", f"Server: {self.server_version}",
                 f"Content-Type: {resp.content_type}", f"Content-Length: {len(resp.body)}"]
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
        try:
            # One write of head+body: one TCP segment burst, no Nagle/delayed-ACK interplay.
            self.wfile.write(head + (b"" if self.command == "HEAD" else resp.body))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its read timeout); nothing to do


class SimulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Handler threads idle on keep-alive sockets; server_close() must not wait for them.
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: SimulatorState) -> None:
        self.state = state
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)
        host, port = self.server_address[:2]
        self.url = f"http://{host}:{port}"

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall offline.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class SimulatorHandle:
    """A running simulator: ``url``, ``host``, ``port``, ``endpoint`` (for the OutboundBot SDK Config),
    ``dashscope_base_url`` (for dashscope's ``base_address``), ``state``; ``stop()``; a context manager."""

    def __init__(self, server: SimulatorHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])
        self.url = f"http://{self.host}:{self.port}"
        self.endpoint = f"{self.host}:{self.port}"
        self.dashscope_base_url = f"{self.url}/api/v1"
        self.state: SimulatorState = server.state
        self._stopped = False

    def stop(self) -> None:
        """Stops serving and drops open keep-alive connections (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> SimulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatorHandle({self.url})"


def start_simulator(host: str = "127.0.0.1", port: int = 0,
                    state: SimulatorState | None = None) -> SimulatorHandle:
    """Starts the simulator on a background thread (port 0: any free port) and returns its handle."""
    server = SimulatorHTTPServer((host, port), state or SimulatorState())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"simulator-{server.server_address[1]}", daemon=True)
    thread.start()
    return SimulatorHandle(server, thread)
