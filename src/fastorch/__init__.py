"""fastorch: a fast process supervisor for Linux hosts.

The rules live in the compiled engine, :mod:`fastorch._core`; the rest of
the package is the shell that feeds it events and carries out its actions.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastorch")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
