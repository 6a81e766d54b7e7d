"""The package version, read from the installed metadata.

``version`` in ``pyproject.toml`` is the one place the version is written; this module reads it
back, so ``sae_losses.__version__`` always equals the version pip reports.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("sae_losses")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
