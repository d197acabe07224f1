"""The one wrapper around the alert webhook: a JSON POST with a timeout and retries (urllib3's
own Retry, through requests)."""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry


def post_json(url: str, payload: dict, timeout_s: float = 10.0) -> int:
    """POST `payload`; returns the HTTP status. Raises requests' errors after 3 tries."""
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(total=3, backoff_factor=0.5, allowed_methods=None,
                                                           status_forcelist=(429, 500, 502, 503, 504))))
    session.mount("https://", session.get_adapter("http://"))
    with session:
        response = session.post(url, json=payload, timeout=timeout_s)
        response.raise_for_status()
        return response.status_code


class WebhookError(RuntimeError):
    """A post the webhook did not take: an HTTP error, or a chat tool's own error code."""


def post_chat_message(url: str, payload: dict, timeout_s: float = 5.0, retries: int = 2) -> int:
    """POST `payload` like `post_json`, and also refuse an HTTP 200 that carries the chat tool's
    error (DingTalk and WeCom `errcode`, Feishu `code`/`StatusCode`, non-zero): such a message was
    not delivered. Returns the HTTP status; raises WebhookError."""
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(total=retries, backoff_factor=0.5, allowed_methods=None,
                                                           status_forcelist=(429, 500, 502, 503, 504))))
    session.mount("https://", session.get_adapter("http://"))
    try:
        with session:
            response = session.post(url, json=payload, timeout=timeout_s)
            response.raise_for_status()
    except requests.RequestException as exc:
        # The URL is a secret (the bot's token is in it): name the error, never the URL.
        raise WebhookError(f"{type(exc).__name__} (HTTP {getattr(exc.response, 'status_code', None)})") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("errcode", "code", "StatusCode"):
            if isinstance(body.get(key), int) and body[key] != 0:
                message = str(body.get("errmsg") or body.get("msg") or "")[:200]
                raise WebhookError(f"the webhook answered {key} {body[key]}: {message}")
    return response.status_code
