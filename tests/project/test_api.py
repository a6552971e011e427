"""The public surface: ``aioancillary.__all__`` is complete, importable and documented.

Written to keep passing as names are added: every check runs over whatever ``__all__`` holds.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import tomllib
from pathlib import Path
from typing import Any

import aioancillary

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = sorted(aioancillary.__all__)


def _ours(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == "aioancillary" or module.startswith("aioancillary.")


def _own_doc(obj: Any) -> str | None:
    """The docstring written for ``obj`` itself (not inherited, not auto-generated)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not doc or not doc.strip():
        return None
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return None  # the signature that dataclass / NamedTuple write when there is no doc
    return str(doc)


def test_all_has_no_duplicates() -> None:
    assert len(aioancillary.__all__) == len(set(aioancillary.__all__))


def test_all_names_exist() -> None:
    missing = [name for name in PUBLIC if not hasattr(aioancillary, name)]
    assert not missing, f"aioancillary.__all__ lists missing names {missing}"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from aioancillary import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == PUBLIC


def test_public_classes_and_functions_are_documented() -> None:
    undocumented = [
        name
        for name in PUBLIC
        if (inspect.isclass(obj := getattr(aioancillary, name)) or inspect.isfunction(obj))
        and not _own_doc(obj)
    ]  # constants and type aliases are documented in their modules
    assert not undocumented, f"no docstring: {undocumented}"


def _undocumented_members(cls: type) -> list[str]:
    missing = []
    for attr, value in vars(cls).items():
        if attr.startswith("_"):
            continue  # private, or a dunder documented by the protocol it implements
        if not isinstance(value, staticmethod | classmethod | property) and not (
            inspect.isfunction(value)
        ):
            continue  # fields, constants
        # getdoc falls back to the base class's docstring: an override of a documented
        # method (a protocol callback, say) needs none of its own.
        if not inspect.getdoc(getattr(cls, attr)):
            missing.append(attr)
    return missing


def test_public_methods_are_documented() -> None:
    missing = {
        name: members
        for name in PUBLIC
        if inspect.isclass(obj := getattr(aioancillary, name))
        and _ours(obj)
        and (members := _undocumented_members(obj))
    }
    assert not missing, f"undocumented public members: {missing}"


def test_nothing_public_is_missing_from_all() -> None:
    """A class or function of the package reachable from it is either in __all__ or private."""
    unlisted = [
        name
        for name, obj in vars(aioancillary).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and _ours(obj)
        and name not in aioancillary.__all__
    ]
    assert not unlisted, f"defined in aioancillary but missing from __all__: {unlisted}"


def test_every_exported_exception_is_an_ancillary_error() -> None:
    for name in PUBLIC:
        obj = getattr(aioancillary, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException) and _ours(obj):
            assert issubclass(obj, aioancillary.AncillaryError), name


def test_version_is_written_once() -> None:
    """pyproject.toml takes the version from ``_core/_version.py`` (where the package and its
    tools import it from); the installed metadata agrees."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "src/aioancillary/_core/_version.py"
    assert importlib.metadata.version("aioancillary") == aioancillary.__version__


def test_core_names_are_exported() -> None:
    # The sans-I/O core and the blocking helpers; later layers only add to this.
    core = {
        "SCM_MAX_FD",
        "AncillaryError",
        "AncillaryMessage",
        "CloexecError",
        "Credentials",
        "DataTruncatedError",
        "FdTruncatedError",
        "FrameDecoder",
        "InvalidFdError",
        "OwnedFd",
        "Platform",
        "ProtocolError",
        "ReceivedInto",
        "SocketAncillary",
        "TooManyFdsError",
        "buffer_size_for_rights",
        "frame_header",
        "recv_fds",
        "recv_fds_into",
        "send_fds",
    }
    assert core <= set(aioancillary.__all__)
