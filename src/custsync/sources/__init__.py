"""Sources: where customers are read from."""
