"""aioancillary: leak-proof, asyncio-native file-descriptor passing over Unix sockets.

Layers, bottom up (each uses only the ones below it):

* sans-I/O core: :class:`OwnedFd`, :class:`AncillaryMessage`, :class:`SocketAncillary`,
  :class:`FrameDecoder` (no sockets);
* blocking helpers: :func:`send_fds`, :func:`recv_fds`, :func:`recv_fds_into`;
* asyncio: :class:`AncillaryConnection` with :func:`open_unix_connection`,
  :func:`start_unix_server`, :func:`connection_pair`; and, for your own protocols,
  :class:`AncillaryTransport` / :class:`AncillaryProtocol` with :func:`create_unix_connection`
  and :func:`create_unix_server`.
"""

from __future__ import annotations

from ._blocking import ReceivedInto, recv_fds, recv_fds_into, send_fds
from ._client import connection_pair, create_unix_connection, open_unix_connection
from ._cmsg import Credentials, SocketAncillary
from ._connection import DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_QUEUED_FDS, AncillaryConnection
from ._errors import (
    AncillaryError,
    CloexecError,
    ConnectionClosedError,
    DataTruncatedError,
    FdsInFlightError,
    FdTruncatedError,
    InvalidFdError,
    MessageTooLargeError,
    PeerRejectedError,
    ProtocolError,
    TooManyFdsError,
)
from ._fd import FdLike, HasFileno, OwnedFd
from ._framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, FrameDecoder, frame_header
from ._message import AncillaryMessage
from ._peercred import peer_credentials
from ._platform import SCM_MAX_FD, Platform, buffer_size_for_rights, current_platform
from ._protocol import AncillaryProtocol
from ._server import (
    AncillaryServer,
    Handler,
    ServerStats,
    create_unix_server,
    start_unix_server,
)
from ._transport import AncillaryTransport
from ._unix import Authorize

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_FDS",
    "FRAME_HEADER_SIZE",
    "SCM_MAX_FD",
    "AncillaryConnection",
    "AncillaryError",
    "AncillaryMessage",
    "AncillaryProtocol",
    "AncillaryServer",
    "AncillaryTransport",
    "Authorize",
    "CloexecError",
    "ConnectionClosedError",
    "Credentials",
    "DataTruncatedError",
    "FdLike",
    "FdTruncatedError",
    "FdsInFlightError",
    "FrameDecoder",
    "Handler",
    "HasFileno",
    "InvalidFdError",
    "MessageTooLargeError",
    "OwnedFd",
    "PeerRejectedError",
    "Platform",
    "ProtocolError",
    "ReceivedInto",
    "ServerStats",
    "SocketAncillary",
    "TooManyFdsError",
    "buffer_size_for_rights",
    "connection_pair",
    "create_unix_connection",
    "create_unix_server",
    "current_platform",
    "frame_header",
    "open_unix_connection",
    "peer_credentials",
    "recv_fds",
    "recv_fds_into",
    "send_fds",
    "start_unix_server",
]
