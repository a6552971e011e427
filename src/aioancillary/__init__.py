"""aioancillary: leak-proof, asyncio-native file-descriptor passing over Unix sockets.

Layers, bottom up (each uses only the ones below it):

* sans-I/O core: :class:`OwnedFd`, :class:`AncillaryMessage`, :class:`SocketAncillary`,
  :class:`FrameDecoder` (no sockets);
* blocking helpers: :func:`send_fds`, :func:`recv_fds`, :func:`recv_fds_into`;
* asyncio: :class:`AncillaryTransport` / :class:`AncillaryProtocol`,
  :class:`AncillaryConnection`, :func:`open_unix_connection`, :func:`start_unix_server`,
  :func:`connection_pair`.
"""

from __future__ import annotations

from ._blocking import ReceivedInto, recv_fds, recv_fds_into, send_fds
from ._cmsg import Credentials, SocketAncillary
from ._errors import (
    AncillaryError,
    CloexecError,
    ConnectionClosedError,
    DataTruncatedError,
    FdsInFlightError,
    FdTruncatedError,
    InvalidFdError,
    PeerRejectedError,
    ProtocolError,
    TooManyFdsError,
)
from ._fd import FdLike, HasFileno, OwnedFd
from ._framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, FrameDecoder, frame_header
from ._message import AncillaryMessage
from ._platform import SCM_MAX_FD, Platform, buffer_size_for_rights, current_platform

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_HEADER_SIZE",
    "SCM_MAX_FD",
    "AncillaryError",
    "AncillaryMessage",
    "CloexecError",
    "ConnectionClosedError",
    "Credentials",
    "DataTruncatedError",
    "FdLike",
    "FdTruncatedError",
    "FdsInFlightError",
    "FrameDecoder",
    "HasFileno",
    "InvalidFdError",
    "OwnedFd",
    "PeerRejectedError",
    "Platform",
    "ProtocolError",
    "ReceivedInto",
    "SocketAncillary",
    "TooManyFdsError",
    "buffer_size_for_rights",
    "current_platform",
    "frame_header",
    "recv_fds",
    "recv_fds_into",
    "send_fds",
]
