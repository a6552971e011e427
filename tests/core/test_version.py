"""The version (``_core/_version.py``): written once, the same everywhere it shows."""

from __future__ import annotations

import re

import aioancillary
from aioancillary._core._version import __version__


def test_the_package_exports_the_core_version() -> None:
    assert aioancillary.__version__ is __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", __version__)
