"""Resilience policies: each wraps a handler, `(Handler) -> Handler`, building its state once."""
