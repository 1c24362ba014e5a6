"""The `envoy` stack: one Envoy sidecar per service instance plus an Envoy ingress gateway.

`config` generates and validates the bootstrap files and reads the admin
stats that prove traffic crossed every proxy; `runner` starts the proxies
under a `harness.procs.Supervisor`.
"""
