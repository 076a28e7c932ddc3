"""sidecar: a drop-in observability proxy for machine-learning model servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
