"""`sidecar loadtest`: traffic at a fixed rate, a latency table, the sidecar's overhead
(docs/loadtest.md)."""
