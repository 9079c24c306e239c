"""A high-concurrency API gateway: streaming proxy, upstream policies, fan-out aggregation."""

__version__ = "0.1.0"
