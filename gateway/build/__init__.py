"""The factory: settings in, a `Runtime` out (routes, handler chains, edge filters,
upstreams with their policy state). The only reader of the settings models after the
command line."""
