"""Operations: the admin app, Prometheus metrics, JSON logs and the status page (its
board on the hot path, the snapshots workers exchange, and the page itself)."""
