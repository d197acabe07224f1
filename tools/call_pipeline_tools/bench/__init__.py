"""`call-pipeline bench`, by concern: `cli` (the command line and the benchmark's course), `crm`
(the CRM and its seeded tasks), `cloud` (the simulator in a child process), `environment` (the
pipeline's variables, the Dagster home, the daemon's instance), `running` (one run, Celery
workers), `daemon` (many tasks through dagster-daemon), `measuring`, `report`; `live`
(`--live N`) and `sensor_hour` (`--sensor-hour`) are benchmarks of their own on the same parts."""
