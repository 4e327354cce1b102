"""async-data-processor: an HTTP ingestion API and a background processor over RabbitMQ."""
