"""The version of claire_py (one place: the package, registration.json and pyproject read it)."""

__version__ = "0.1.0.dev0"
