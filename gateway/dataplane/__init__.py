"""The data plane: the ASGI app every request goes through, its state records, routing,
headers and bodies, aggregation, WebSockets and the one logging phase. It sees the
compiled runtime, never the settings models."""
