"""The fd holder protocol without sockets: what a client makes of each answer, and what a new
holder makes of a running holder's offer. Every malformed answer raises ``FdHolderError`` and
leaves no fd open (the messages carry real pipes)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from aioancillary import (
    AncillaryMessage,
    FdHolderEntry,
    FdHolderError,
    FdHolderExistsError,
    FdHolderFullError,
    FdHolderNotFoundError,
    FdHolderRefusedError,
    NamedFds,
    OwnedFd,
)
from aioancillary._fdholder._takeover import (
    Offer,
    OfferedEntry,
    _read_offer,
    adopt,
    check_fits,
)
from aioancillary._fdholder._wire import (
    ERROR_CODES,
    HolderInfo,
    decode,
    encode,
    error_of,
    read_entries,
    read_fds,
    read_hello,
    read_ok,
)


@pytest.fixture
def fd() -> Iterator[int]:
    """A pipe's write end that messages may carry; whoever holds a copy closes it."""
    r, w = os.pipe()
    yield w
    os.close(r)
    os.close(w)


def message(body: Any, fds: tuple[int, ...] = ()) -> AncillaryMessage:
    """A received message owning duplicates of ``fds``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return AncillaryMessage(data, tuple(OwnedFd(os.dup(fd)) for fd in fds))


def test_encode_and_decode_round_trip() -> None:
    assert decode(encode("store", name="web", timeout=None)) == {
        "op": "store",
        "name": "web",
        "timeout": None,
    }
    for bad in (b"", b"\xff", b"[1]", b'{"op": 1}', b"{}"):
        assert decode(bad) is None


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("not-found", FdHolderNotFoundError),
        ("exists", FdHolderExistsError),
        ("full", FdHolderFullError),
        ("denied", FdHolderRefusedError),
        ("busy", FdHolderError),
        (7, FdHolderError),
    ],
)
def test_error_answers_become_their_exception(code: object, kind: type[Exception]) -> None:
    exc = error_of({"op": "error", "code": code, "message": "because"})
    assert type(exc) is kind
    assert str(exc) == "the fd holder refused: because"
    assert exc.code == (code if isinstance(code, str) else "protocol")
    assert str(error_of({"op": "error", "code": "full"})).endswith(ERROR_CODES["full"])


def test_hello() -> None:
    hello = {"op": "hello", "version": 1, "pid": 42, "max_entries": 5, "max_fds": 9}
    assert read_hello(message(hello)) == HolderInfo(1, 42, 5, 9)
    with pytest.raises(FdHolderError, match="version 2, which this library does not speak"):
        read_hello(message({**hello, "version": 2}))
    with pytest.raises(FdHolderError, match="pid=-1 is not a count"):
        read_hello(message({**hello, "pid": -1}))
    with pytest.raises(FdHolderError, match="is this the socket of an aioancillary fd holder"):
        read_hello(message(b"SSH-2.0-OpenSSH"))


def test_answers_with_stray_fds_are_refused_and_the_fds_closed(fd: int) -> None:
    msg = message({"op": "ok"}, (fd, fd))
    with pytest.raises(FdHolderError, match="the 'ok' answer carried fds"):
        read_ok(msg)
    assert msg.fd_count == 0
    msg = message({"op": "error", "code": "full"}, (fd,))
    with pytest.raises(FdHolderFullError):
        read_ok(msg)
    assert msg.fd_count == 0
    with pytest.raises(FdHolderError, match="expected 'ok', got 'entries'"):
        read_ok(message({"op": "entries", "entries": []}, (fd,)))


def test_fds_answers(fd: int) -> None:
    fds, ack = read_fds(
        message({"op": "fds", "name": "web", "count": 2, "ack": True}, (fd, fd)), "web"
    )
    try:
        assert len(fds) == 2
        assert ack is True
    finally:
        for owned in fds:
            owned.close()
    for body, count in [
        ({"op": "fds", "name": "other", "count": 1}, 1),  # not what was asked for
        ({"op": "fds", "name": "web", "count": 2}, 1),  # the count is wrong
        ({"op": "fds", "name": "web", "count": 0}, 0),  # no fd at all
    ]:
        msg = message(body, (fd,) * count)
        with pytest.raises(FdHolderError, match="every fd received was closed"):
            read_fds(msg, "web")
        assert msg.fd_count == 0


def test_entries_answers() -> None:
    body = {
        "op": "entries",
        "entries": [
            {"name": "a", "fds": 1, "expires_in": None},
            {"name": "b", "fds": 3, "expires_in": 2},
        ],
    }
    assert read_entries(message(body)) == [FdHolderEntry("a", 1, None), FdHolderEntry("b", 3, 2.0)]
    for bad in (
        {"op": "entries"},
        {"op": "entries", "entries": [["a", 1]]},
        {"op": "entries", "entries": [{"name": "a", "fds": "1"}]},
        {"op": "entries", "entries": [{"name": "a", "fds": 1, "expires_in": True}]},
    ):
        with pytest.raises(FdHolderError, match="protocol error"):
            read_entries(message(bad))


# -- a running holder's offer, read by a new holder -------------------------------------------


def offer_of(body: Any, fds: tuple[int, ...] = ()) -> Offer:
    conn: Any = None  # the offer is read without I/O: no connection is needed
    return _read_offer(conn, message(body, fds))


def test_offers_are_read_and_checked() -> None:
    entries = [{"name": "web", "key": "e0", "fds": 2, "expires_in": 3.5}]
    offer = offer_of({"op": "offered", "pid": 7, "entries": entries})
    assert (offer.pid, offer.entries) == (7, [OfferedEntry("web", "e0", 2, 3.5)])
    assert offer.fd_count == 2
    with pytest.raises(FdHolderFullError):
        offer_of({"op": "error", "code": "full", "message": "no"})
    bad_entries: list[Any] = [
        "web",
        {"name": "a:b", "key": "e0", "fds": 1},
        {"name": "web", "key": 0, "fds": 1},
        {"name": "web", "key": "e0", "fds": 0},
        {"name": "web", "key": "e0", "fds": 254},
        {"name": "web", "key": "e0", "fds": 1, "expires_in": "soon"},
    ]
    for entry in bad_entries:
        with pytest.raises(FdHolderError, match="takeover protocol error"):
            offer_of({"op": "offered", "pid": 7, "entries": [entry]})
    for body in ({"op": "offered", "entries": []}, {"op": "ok"}, b"junk"):
        with pytest.raises(FdHolderError, match="takeover protocol error"):
            offer_of(body)


def test_an_offer_over_this_holder_s_bounds_is_refused() -> None:
    offer = offer_of({"op": "offered", "pid": 7, "entries": [{"name": "a", "key": "e0", "fds": 3}]})
    check_fits(offer, max_entries=1, max_fds=3)
    with pytest.raises(FdHolderError, match=r"--max-entries 1, --max-fds 2\)") as caught:
        check_fits(offer, max_entries=1, max_fds=2)
    assert caught.value.code == "full"


def test_adopting_an_offer_moves_every_fd_or_closes_it(fd: int) -> None:
    offer = offer_of(
        {
            "op": "offered",
            "pid": 7,
            "entries": [
                {"name": "web", "key": "e0", "fds": 1, "expires_in": None},
                {"name": "pair", "key": "e1", "fds": 2, "expires_in": 0},
            ],
        }
    )
    kept: dict[str, tuple[tuple[OwnedFd, ...], float | None]] = {}

    def add(name: str, fds: tuple[OwnedFd, ...], expires_in: float | None) -> None:
        kept[name] = (fds, expires_in)

    inherited = NamedFds([(k, OwnedFd(os.dup(fd))) for k in ("e0", "e1", "e1")], "predecessor")
    adopt(offer, inherited, add)
    assert {name: (len(fds), t) for name, (fds, t) in kept.items()} == {
        "web": (1, None),
        "pair": (2, 1e-3),  # due during the freeze: expires right after the takeover
    }
    assert len(inherited) == 0
    for fds, _ in kept.values():
        for owned in fds:
            owned.close()

    # An entry whose fds did not all arrive: nothing of it is kept, its fds are closed.
    short = NamedFds([("e0", OwnedFd(os.dup(fd))), ("e1", OwnedFd(os.dup(fd)))], "predecessor")
    with pytest.raises(FdHolderError, match="1 fd\\(s\\) arrived for 'pair', the offer said 2"):
        adopt(offer, short, lambda name, fds, t: kept.update({name: (fds, t)}) or None)
    for fds, _ in kept.values():
        for owned in fds:
            owned.close()
    assert len(short) == 0
    # A key that never arrived.
    with pytest.raises(FdHolderError, match="no fd named 'e0'"):
        adopt(offer, NamedFds(), add)

    def refuse(name: str, fds: tuple[OwnedFd, ...], expires_in: float | None) -> None:
        raise ValueError("full")

    inherited = NamedFds([("e0", OwnedFd(os.dup(fd)))], "predecessor")
    with pytest.raises(FdHolderError, match="cannot keep 'web': full"):
        adopt(offer, inherited, refuse)
