"""Local simulator of Alibaba Cloud OutboundBot and DashScope, for tests and the demo (see ``server``)."""

from call_pipeline_tools.simulator.server import SimulatorHandle, start_simulator
from call_pipeline_tools.simulator.state import SimulatorState

__all__ = ["SimulatorHandle", "SimulatorState", "start_simulator"]
