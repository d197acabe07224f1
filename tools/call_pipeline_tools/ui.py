"""`call-pipeline ui`: the demo CRM and the simulator, with `serve` on top (daemon and webserver):
the sensors and the schedule run live, and runs, backfills and re-executions can be driven from the UI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from call_pipeline.clients.proxies import drop_proxy_variables
from call_pipeline.serve import Service, install_instance_yaml, serve
from call_pipeline_tools.demo import demo_job_groups, seed_demo_crm
from call_pipeline_tools.simulator.scenarios import save_scenario_file


def run_ui(data_dir: Path | None, port: int, simulator_port: int, reset: bool) -> int:
    # A folder of its own, under the current one (never inside the installed package): `demo`
    # starts from an empty folder each time, and must not take the UI's CRM, scenario and run
    # history with it.
    ui_dir = (data_dir if data_dir else Path.cwd() / "data" / "ui").resolve()
    ui_dir.mkdir(parents=True, exist_ok=True)
    crm_file = ui_dir / "crm.sqlite3"
    scenario_file = ui_dir / "scenario.json"
    crm_url = f"sqlite:///{crm_file}"
    if reset or not crm_file.exists() or not scenario_file.exists():
        tasks = seed_demo_crm(crm_url)
        save_scenario_file(scenario_file, demo_job_groups(crm_url, tasks))
    home = ui_dir / "dagster_home"
    install_instance_yaml(home)
    env = drop_proxy_variables(dict(os.environ))
    env.update({
        "DAGSTER_HOME": str(home),
        "CALL_PIPELINE_CRM_URL": crm_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "demo-access-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "demo-access-secret",
        "OUTBOUNDBOT_INSTANCE_ID": "demo-instance",
        "OUTBOUNDBOT_ENDPOINT": f"127.0.0.1:{simulator_port}",
        "OUTBOUNDBOT_PROTOCOL": "http",
        "DASHSCOPE_API_KEY": "sk-demo",
        "DASHSCOPE_HTTP_BASE_URL": f"http://127.0.0.1:{simulator_port}/api/v1",
        "CALL_PIPELINE_SENSOR_INTERVAL_SECONDS": env.get("CALL_PIPELINE_SENSOR_INTERVAL_SECONDS", "120"),
    })
    simulator = Service("simulator", (sys.executable, "-m", "call_pipeline_tools.simulator", "--host", "127.0.0.1",
                                      "--port", str(simulator_port), "--scenario", str(scenario_file)),
                        port=simulator_port)
    print(f"The demo: simulator on 127.0.0.1:{simulator_port}, CRM and Dagster home in {ui_dir}", flush=True)
    return serve(ui=True, host="127.0.0.1", port=port, data_dir=ui_dir, env=env, before=[simulator])
