"""The metarec streaming consumer service."""
