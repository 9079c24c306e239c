"""Reference proxies the benchmark measures the gateway against (see load/README.md)."""
