"""The kopf operator: scales consumer replicas from queue backlog and pool saturation.

Always imported as `services.operator` (a top-level `operator` would shadow the standard
library's module); `async-data-processor operator` runs it."""
