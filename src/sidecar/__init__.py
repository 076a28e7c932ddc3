"""sidecar: a drop-in observability proxy for machine-learning model servers."""

# The one place the version is written (pyproject.toml reads it). Not importlib.metadata: that
# pulls email, zipfile and csv into every process, about 0.7 MB of the serving one's memory.
__version__ = "0.1.0"

__all__ = ["__version__"]
