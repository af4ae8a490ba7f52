"""intermediary."""
