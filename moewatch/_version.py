"""The package version, importable without importing the package (the CLI's --version, report lines)."""

__version__ = "0.1.0"
