"""call_pipeline: OutboundBot call results back into the CRM, as a Dagster project."""

import sys
import warnings

# Dagster's own sensor decorator passes one of its beta parameters (`owners`); the warning it
# prints at every start says nothing an operator can act on.
warnings.filterwarnings("ignore", message=r"Parameter `owners` of initializer `SensorDefinition")

# A run worker of the sync job starts its forkserver as soon as it imports the project; the
# check on its command line costs nothing elsewhere (call_pipeline/executors.py says why).
if "execute_run" in sys.argv:
    from call_pipeline.executors import start_forkserver_early

    start_forkserver_early(sys.argv)
