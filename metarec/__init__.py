"""metarec: a streaming meta-learning recommender."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("metarec")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
