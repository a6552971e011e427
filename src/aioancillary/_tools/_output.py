"""What the commands share about their output (a module of its own, so that ``_demo`` need
not import ``_cli``, which imports it)."""

__all__ = ["OutputClosed"]


class OutputClosed(Exception):
    """Standard output's reader went away (raised instead of a `BrokenPipeError` that code
    handling connection errors would mistake for its own)."""
