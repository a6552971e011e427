"""``AncillaryProtocol`` (``_asyncio/_protocol.py``): the default callbacks, who owns a message,
and what a protocol factory must return."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from helpers import (
    RecordingProtocol,
    is_open,
    tagged_pipe,
    wait_until,
    within,
)

from aioancillary import (
    AncillaryMessage,
    AncillaryProtocol,
    AncillaryTransport,
    frame_header,
)
from aioancillary._asyncio._protocol import protocol_from


async def test_messages_received_gets_a_batch_and_default_message_received_closes() -> None:
    loop = asyncio.get_running_loop()
    batches: list[list[AncillaryMessage]] = []

    class Batching(RecordingProtocol):
        def messages_received(self, messages: list[AncillaryMessage]) -> None:
            batches.append(list(messages))
            for msg in messages:
                AncillaryProtocol.message_received(self, msg)  # the default: closes it
            self.arrived.set()

    left, right = socket.socketpair()
    r = tagged_pipe(b"x")
    proto = Batching()
    transport = AncillaryTransport(loop, right, proto)
    try:
        # Three frames in one sendmsg: they are decoded from one read, handed over at once.
        wire = frame_header(1, 1) + b"a" + frame_header(0, 1) + b"b" + frame_header(0, 0)
        socket.send_fds(left, [wire], [r])
        await within(proto.arrived.wait())
        assert [[m.data for m in batch] for batch in batches] == [[b"a", b"b", b""]]
        assert batches[0][0].fds == ()  # closed by the default message_received
    finally:
        os.close(r)
        left.close()
        transport.close()
        await within(proto.lost)


async def test_protocol_raising_closes_the_messages_it_did_not_get() -> None:
    loop = asyncio.get_running_loop()
    errors: list[BaseException | None] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))

    class Failing(RecordingProtocol):
        def message_received(self, message: AncillaryMessage) -> None:
            super().message_received(message)
            raise RuntimeError("handler bug")

    left, right = socket.socketpair()
    pipes = [tagged_pipe(i) for i in range(3)]
    proto = Failing()
    transport = AncillaryTransport(loop, right, proto)
    try:
        wire = b"".join(frame_header(1, 1) + b"%d" % i for i in range(3))
        socket.send_fds(left, [wire], pipes)
        for fd in pipes:
            os.close(fd)
        await wait_until(lambda: bool(errors))
        assert isinstance(errors[0], RuntimeError)
        # Only the first was handed over; the two others were closed (fd-count fixture).
        assert [m.data for m in proto.messages] == [b"0"]
    finally:
        loop.set_exception_handler(None)
        left.close()
        transport.abort()
        await within(proto.lost)
        proto.close_messages()


def test_protocol_from_refuses_a_factory_returning_none() -> None:
    def forgot_to_return() -> AncillaryProtocol:
        AncillaryProtocol()
        return None  # type: ignore[return-value]

    with pytest.raises(TypeError, match="returned None"):
        protocol_from(forgot_to_return)
    made = AncillaryProtocol()
    assert protocol_from(lambda: made) is made


def test_default_messages_unsent_closes_them() -> None:
    r, w = os.pipe()
    os.close(w)
    from aioancillary._core._message import new_message  # noqa: PLC0415

    msg = new_message(b"never sent", [r])
    AncillaryProtocol().messages_unsent([msg])
    assert msg.fd_count == 0
    assert not is_open(r)


def test_default_eof_received_lets_the_transport_close() -> None:
    assert not AncillaryProtocol().eof_received()
