"""Distributed tracing: W3C Trace Context (and B3) through every hop, OpenTelemetry
spans exported over OTLP/HTTP (docs/tracing.md).

`propagation` reads and writes the headers by hand; `spans` holds the per-process
`Tracer`, the per-request `RequestTrace` and the CLIENT span of each upstream try;
`export` is the only module that imports OpenTelemetry, and it is imported only when
the `tracing` block is set. With tracing unset nothing here is on the request path.
"""
