"""Index shard service: per-database (per-category) catalogue signatures, searched exactly."""
