"""The chat webhook wrapper against a local HTTP server: an HTTP 200 that carries the chat
tool's own error code is a failed post, and the error never shows the webhook's URL."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from call_pipeline.clients.webhook import WebhookError, post_chat_message


@pytest.fixture
def chat():
    answers: list[tuple[int, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body = answers.pop(0) if answers else (200, {"errcode": 0})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/robot/send?access_token=secret-token", answers
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_chat_error_in_an_http_200_is_a_failed_post(chat):
    url, answers = chat
    assert post_chat_message(url, {"msgtype": "text"}) == 200
    for body in ({"errcode": 310000, "errmsg": "keywords not in content"}, {"code": 19021, "msg": "sign match fail"},
                 {"StatusCode": 1, "msg": "bad"}):
        answers.append((200, body))
        with pytest.raises(WebhookError, match="the webhook answered"):
            post_chat_message(url, {"msgtype": "text"})


def test_an_http_error_names_no_url(chat):
    url, answers = chat
    answers.extend([(500, {})] * 3)
    with pytest.raises(WebhookError) as error:
        post_chat_message(url, {"msgtype": "text"}, retries=2)
    assert "secret-token" not in str(error.value) and not answers  # tried three times
