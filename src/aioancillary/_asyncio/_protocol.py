"""The protocol side of [`AncillaryTransport`][aioancillary.AncillaryTransport]: messages arrive
with their owned fds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from .._core._message import AncillaryMessage

__all__ = ["AncillaryProtocol", "protocol_from"]

_P = TypeVar("_P", bound="AncillaryProtocol")


class AncillaryProtocol(asyncio.BaseProtocol):
    """Callbacks of an [`AncillaryTransport`][aioancillary.AncillaryTransport]: messages arrive with
    their owned fds.

    Override [`message_received`][aioancillary.AncillaryProtocol.message_received] (or
    [`messages_received`][aioancillary.AncillaryProtocol.messages_received], which gets every
    message decoded from one read at once). The protocol owns each message it receives and must
    close it (``with msg:``) or take its fds. ``connection_made``, ``connection_lost``,
    ``pause_writing`` and ``resume_writing`` are as in `asyncio.BaseProtocol`.

    A callback that raises is reported once to the loop's exception handler. If
    ``connection_made`` raises, no transport is made (a server closes that connection and
    serves on). If a message callback raises, it gives up the messages of that call: the
    transport closes every fd they still hold (fds already taken out stay the protocol's),
    then closes the connection, as asyncio's transports do when ``data_received`` raises.

    Example::

        class Worker(AncillaryProtocol):
            def message_received(self, msg: AncillaryMessage) -> None:
                with msg:
                    serve(msg.take_fd().into_socket())
    """

    def messages_received(self, messages: list[AncillaryMessage]) -> None:
        """Called with the messages decoded from one read, in order.

        The default calls [`message_received`][aioancillary.AncillaryProtocol.message_received] for
        each. If one raises, the messages not yet handed over are closed and the error propagates.
        """
        for i, msg in enumerate(messages):
            try:
                self.message_received(msg)
            except BaseException:
                for rest in messages[i + 1 :]:
                    rest.close()  # never handed over: the protocol cannot own them
                raise

    def message_received(self, message: AncillaryMessage) -> None:
        """Called for every received message. The default closes it (its fds are closed)."""
        message.close()

    def messages_unsent(self, messages: list[AncillaryMessage]) -> None:
        """Called with queued messages that never reached the kernel, when the transport drops its
        queue ([`AncillaryTransport.abort`][aioancillary.AncillaryTransport.abort], a fatal error, a
        peer that went away).

        None of their bytes, and so none of their fds, left this process: each message owns
        its fds again (``data`` is the payload as written) and can be sent elsewhere. The
        default closes them. Messages the kernel already took are not among them: if the peer
        never reads them, they are lost with its socket.
        """
        for msg in messages:
            msg.close()

    def eof_received(self) -> bool | None:
        """The peer closed its sending side. Return true to keep the transport open."""
        return None


def protocol_from(protocol_factory: Callable[[], _P]) -> _P:
    """Call ``protocol_factory``; refuse what cannot be a protocol before a transport is made.

    Raises:
        TypeError: the factory returned ``None`` (a class's ``__init__`` cannot; a function
            that forgot its ``return`` does).
    """
    protocol = protocol_factory()
    if protocol is None:
        raise TypeError(
            f"protocol_factory {protocol_factory!r} returned None: it must return an "
            "AncillaryProtocol (did the function forget its 'return'?)"
        )
    return protocol
