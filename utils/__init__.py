"""Small shared helpers (pure torch)."""
