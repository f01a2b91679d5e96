"""Gateway service: the public API, tokenization, scheduling and the request flow across prefill and decode."""
