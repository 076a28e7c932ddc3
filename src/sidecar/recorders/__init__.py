"""Recorders: turn exchanges and extractions into Prometheus series. They never see HTTP objects."""
