"""Targets: where customers are written to."""
