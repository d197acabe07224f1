"""call_pipeline: OutboundBot call results back into the CRM, as a Dagster project."""

import warnings

# Dagster's own sensor decorator passes one of its beta parameters (`owners`); the warning it
# prints at every start says nothing an operator can act on.
warnings.filterwarnings("ignore", message=r"Parameter `owners` of initializer `SensorDefinition")

