"""`sidecar serve --workers N`: a supervisor, its workers, and how their metrics are merged."""
