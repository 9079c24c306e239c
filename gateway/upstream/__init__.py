"""Upstreams: targets and their live state, balancers, active health checks, the pooled
client with one try per call, and the transports under it. Knows nothing of config,
policies or edge filters."""
