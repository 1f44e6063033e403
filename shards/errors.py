"""The one exception type of shards/: its message is the one line the user sees."""


class ShardError(Exception):
    """Bad input or environment (missing path, unknown dataset, disk full, corrupt shard)."""
