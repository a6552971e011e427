"""A griffe extension for the docs site: docstrings' Sphinx roles become links or code.

The package's docstrings write cross-references as Sphinx roles (``:class:`OwnedFd```), which
read well in ``help()``. mkdocstrings renders Markdown, so the site turns each role into an
autorefs link when it names something the package exports (``[`OwnedFd`][aioancillary.OwnedFd]``)
and into plain code otherwise (stdlib names, methods named without their class).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import aioancillary

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+?)`")


def _target(name: str) -> str | None:
    head, _, rest = name.partition(".")
    if head not in aioancillary.__all__:
        return None
    obj: Any = getattr(aioancillary, head)
    for part in rest.split(".") if rest else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return f"aioancillary.{name}"


def _replace(match: re.Match[str]) -> str:
    name = match.group(1).strip()
    shown = name.removesuffix("()")
    target = _target(shown)
    return f"[`{shown}`][{target}]" if target else f"`{shown}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring as the site loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)
