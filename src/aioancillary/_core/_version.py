"""The package's version, written once: the top ``__init__`` re-exports it, the tools print
it, and the build (``[tool.hatch.version]`` in ``pyproject.toml``) reads it from here."""

__version__ = "0.1.0"
