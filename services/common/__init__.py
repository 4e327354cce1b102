"""What both services share: settings base, entry schema, sharding, broker topology and
connection, metrics and logging helpers. Imports nothing from the services."""
