"""mmproxy: unwraps the PROXY protocol so a backend sees the real client address."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmproxy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
