"""Runtime: executors, KV caches, scheduling and sampling over built engines."""
