"""Local simulator of Alibaba Cloud OutboundBot and DashScope, for tests and the demo (see ``server``)."""

from call_pipeline.simulator.server import SimulatorHandle, SimulatorState, start_simulator

__all__ = ["SimulatorHandle", "SimulatorState", "start_simulator"]
