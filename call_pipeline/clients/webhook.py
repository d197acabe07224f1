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
