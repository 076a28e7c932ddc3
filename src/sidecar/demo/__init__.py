"""The demo: a toy iris model, a real MLServer, and `sidecar demo`, which puts the sidecar in
front of one."""
