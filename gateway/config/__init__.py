"""The configuration: frozen settings models, the YAML loader (`${VAR}`, environment
overrides, FILE:LINE:COL errors) and the units it reads. Imports only `types` and
`errors`; nothing here knows what is built from it."""
