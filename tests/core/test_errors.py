"""The exception tree (``_core/_errors.py``): one root, the stdlib types users catch, and
messages that say what happened."""

from __future__ import annotations

import errno

import pytest

import aioancillary
from aioancillary import AncillaryError

EXTRA_BASES = {
    "TooManyFdsError": ValueError,
    "MessageTooLargeError": ValueError,
    "InvalidFdError": ValueError,
    "CloexecError": OSError,
    "FdsInFlightError": OSError,
    "ConnectionClosedError": ConnectionError,
    "PeerRejectedError": PermissionError,
    "FdNameError": LookupError,
    "FdTypeError": TypeError,
    "NotifyError": OSError,
    "HandoffError": ConnectionError,
    "HandoffTimeoutError": TimeoutError,
}


def _errors() -> list[type[BaseException]]:
    return [
        obj
        for name in aioancillary.__all__
        if isinstance(obj := getattr(aioancillary, name), type) and issubclass(obj, BaseException)
    ]


def test_every_error_has_the_one_root() -> None:
    errors = _errors()
    assert AncillaryError in errors
    assert all(issubclass(error, AncillaryError) for error in errors)


@pytest.mark.parametrize(("name", "base"), sorted(EXTRA_BASES.items()))
def test_errors_are_also_the_stdlib_type_users_catch(name: str, base: type) -> None:
    assert issubclass(getattr(aioancillary, name), base)


def test_the_tree_is_drawn_in_the_module_docstring() -> None:
    from aioancillary._core import _errors  # noqa: PLC0415

    doc = _errors.__doc__ or ""
    for error in _errors.__all__:
        assert error in doc, f"{error} is missing from the tree in _errors' docstring"


def test_os_errors_keep_their_errno() -> None:
    error = aioancillary.FdsInFlightError(errno.ETOOMANYREFS, "too many in flight")
    assert error.errno == errno.ETOOMANYREFS
    assert isinstance(error, OSError)
