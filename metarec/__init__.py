"""metarec: a streaming meta-learning recommender.

The design (components, the path of one event and of one model version, where state
lives, how quality is measured, the package layout) is docs/ARCHITECTURE.md.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("metarec")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
