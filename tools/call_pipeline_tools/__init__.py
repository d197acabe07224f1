"""Tools around call_pipeline that its code location never loads: the simulator of OutboundBot and
DashScope (`simulator`), the demo and the UI on the demo CRM (`demo`, `ui`) and the benchmark
(`bench`). A distribution of its own (tools/pyproject.toml), kept out of call_pipeline's wheel;
`call-pipeline demo|ui|simulator|bench` import it when they run."""
