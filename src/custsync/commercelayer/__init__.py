"""Commerce Layer: the API client (auth, pacing, retries) and the connectors built on it."""
