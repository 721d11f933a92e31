"""fastorch: a fast process supervisor for Linux hosts.

The rules live in the compiled engine, :mod:`fastorch._core`; the rest of
the package is the shell that feeds it events and carries out its actions.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
