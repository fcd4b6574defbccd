"""Regional editing: mask schedules, regional attention masks, attention injection (pure torch)."""
