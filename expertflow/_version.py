"""The package version: one place, read by pyproject.toml (setuptools dynamic version) and the library."""

__version__ = "0.2.0"
