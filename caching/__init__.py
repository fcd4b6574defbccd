"""Block-caching policies and per-run reuse state (pure torch)."""
