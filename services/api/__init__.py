"""The ingestion API: POST /message validates, shards and publishes with confirms."""
