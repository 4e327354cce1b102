"""The consumer: per shard, a batcher filling a shared batch and a pool of 3..4 workers
writing sealed batches to durable files, acking only after the write."""
