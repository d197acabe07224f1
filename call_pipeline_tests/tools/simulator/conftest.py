"""Fixtures for the simulator tests: a fresh simulator per test and real-SDK clients pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from alibabacloud_outboundbot20191226.client import Client
from alibabacloud_tea_openapi import models as open_api_models

from call_pipeline.clients.proxies import PROXY_VARIABLES
from call_pipeline_tools.simulator.server import SimulatorHandle, start_simulator


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # darabonba sends even loopback traffic through HTTP(S)_PROXY and ignores NO_PROXY.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with start_simulator() as handle:
        yield handle


@pytest.fixture
def make_client(sim: SimulatorHandle) -> Callable[..., Client]:
    def make(read_timeout: int = 5000) -> Client:
        cfg = open_api_models.Config(access_key_id="fakeAK", access_key_secret="fakeSK", endpoint=sim.endpoint,
                                     protocol="http", read_timeout=read_timeout, connect_timeout=2000)
        return Client(cfg)

    return make


@pytest.fixture
def client(make_client: Callable[..., Client]) -> Client:
    return make_client()
