"""Proxy variables, for processes that talk to the local simulator only (the demo, the UI, the
benchmark, the tests): the Alibaba SDK reads HTTP(S)_PROXY itself and ignores NO_PROXY, so loopback
traffic would go to the proxy. Against the real cloud, proxies are left as they are."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def drop_proxy_variables(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Remove every proxy variable from `env` (default: this process's environment); returns it."""
    target = os.environ if env is None else env
    for name in PROXY_VARIABLES:
        target.pop(name, None)
    return target
