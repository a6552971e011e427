"""The reload handoff's messages: JSON objects in framed messages, fds on ``fds`` only."""

from __future__ import annotations

import json
import os

import pytest
from helpers import is_open, pair
from hypothesis import given
from hypothesis import strategies as st

from aioancillary import AncillaryMessage, OwnedFd
from aioancillary._lifecycle._reload import HandoffError, HandoffTimeoutError
from aioancillary._lifecycle._reload_wire import PeerGone, decode, encode, receive


def test_encode_is_one_compact_json_object() -> None:
    assert encode("hello", version=1, pid=7) == b'{"op":"hello","version":1,"pid":7}'


@given(st.binary(max_size=64) | st.just(b'{"op":"ready","x":1}'))
def test_decode_takes_only_an_expected_object(data: bytes) -> None:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    expected = isinstance(body, dict) and body.get("op") == "ready"
    with AncillaryMessage(data) as msg:
        if expected:
            assert decode(msg, ("ready",)) == body
        else:
            with pytest.raises(HandoffError, match="handoff protocol error"):
                decode(msg, ("ready",))


def test_fds_on_any_message_but_fds_are_a_protocol_error() -> None:
    r, w = os.pipe()
    os.close(w)
    with (
        AncillaryMessage(encode("ready"), (OwnedFd(r),)) as msg,
        pytest.raises(HandoffError, match="a 'ready' message carried fds"),
    ):
        decode(msg, ("ready",))
    assert not is_open(r)  # closed with the message
    with AncillaryMessage(json.dumps({"op": "fds", "names": []}).encode()) as msg:
        assert decode(msg, ("fds",))["names"] == []


async def test_receive_names_the_step_that_timed_out_or_ended() -> None:
    async with pair() as (a, b):
        with pytest.raises(HandoffTimeoutError, match=r"no answer within 0\.01 s while testing"):
            await receive(a, 0.01, "testing")  # b never sends: the timeout must fire
        await b.send(encode("ready"))
        with await receive(a, 5.0, "testing") as msg:
            assert decode(msg, ("ready",)) == {"op": "ready"}
        b.write_eof()
        with pytest.raises(PeerGone, match="closed the handoff connection while testing"):
            await receive(a, 5.0, "testing")
