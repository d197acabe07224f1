"""What every step of a batch works with, built once per op (or once per catch-up) from the
resources: so that a step's signature is `(env, batch) -> StepReport`, whatever it uses of it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from call_pipeline.clients.dashscope_llm import LlmClient
from call_pipeline.clients.outboundbot import OutboundBotClient
from call_pipeline.clients.recording_store import RecordingArchive
from call_pipeline.steps.give_up import UnitLedger


@dataclass(frozen=True)
class StepEnv:
    """The CRM, the clouds' clients, and how the step tells time and logs.

    A client an op has no resource for is None: only the steps that need it read it. `clock`
    gives now as the CRM stores it (naive, in `zone`); a step that needs one "now" for all its
    work reads it once, at its start. With a `ledger`, the units of one lead that keep failing
    are counted and given up (steps/give_up.py). `stop` raises when the run is to end early (its
    Terminate, where no signal reaches it): a step that calls out in many units calls it between
    the batches it writes."""

    engine: Engine
    zone: ZoneInfo
    clock: Callable[[], datetime]
    logger: logging.Logger = logging.getLogger("call_pipeline.steps")
    outboundbot: OutboundBotClient | None = None
    llm: LlmClient | None = None
    llm_concurrency: int = 1
    archive: RecordingArchive | None = None
    ledger: UnitLedger | None = None
    stop: Callable[[], None] = lambda: None
