"""aioancillary: leak-proof, asyncio-native file-descriptor passing over Unix sockets.

Layers, bottom up (each uses only the ones below it):

* sans-I/O core: :class:`OwnedFd`, :class:`AncillaryMessage`, :class:`SocketAncillary`,
  :class:`FrameDecoder` (no sockets);
* blocking helpers: :func:`send_fds`, :func:`recv_fds`, :func:`recv_fds_into`;
* asyncio: :class:`AncillaryConnection` with :func:`open_unix_connection`,
  :func:`start_unix_server`, :func:`connection_pair`; and, for your own protocols,
  :class:`AncillaryTransport` / :class:`AncillaryProtocol` with :func:`create_unix_connection`
  and :func:`create_unix_server`;
* ``authorize=`` policies: :func:`same_user`, :func:`root_or_same_user`, :func:`allow_uids`,
  :func:`allow_gids`, :func:`allow_group_members`;
* daemon lifecycle: :func:`listen_fds` (systemd socket activation, by name, as
  :class:`NamedFds`), :func:`notify` / :func:`notify_async` (``sd_notify``, the fd store),
  :func:`start_generation` / :class:`Generation` (zero-downtime reload by fd handoff);
* hand-off toolkit: :class:`Acceptor` hands accepted clients to worker processes running
  :class:`Worker` (clients arrive as :class:`HandedClient`); :class:`WorkerPool` starts and
  restarts such workers.
"""

from __future__ import annotations

from ._asyncio._client import connection_pair, create_unix_connection, open_unix_connection
from ._asyncio._connection import (
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_FDS,
    AncillaryConnection,
)
from ._asyncio._protocol import AncillaryProtocol
from ._asyncio._server import (
    AncillaryServer,
    Handler,
    ServerStats,
    create_unix_server,
    start_unix_server,
)
from ._asyncio._transport import AncillaryTransport
from ._core._cmsg import Credentials, SocketAncillary
from ._core._errors import (
    ActivationError,
    AncillaryError,
    CloexecError,
    ConnectionClosedError,
    DataTruncatedError,
    FdNameError,
    FdsInFlightError,
    FdTruncatedError,
    FdTypeError,
    HandoffBusyError,
    HandoffError,
    HandoffTimeoutError,
    InvalidFdError,
    MessageTooLargeError,
    NotifyError,
    PeerRejectedError,
    ProtocolError,
    TooManyFdsError,
)
from ._core._fd import FdLike, HasFileno, OwnedFd
from ._core._framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, FrameDecoder, frame_header
from ._core._message import AncillaryMessage
from ._core._platform import SCM_MAX_FD, Platform, buffer_size_for_rights, current_platform
from ._handoff._acceptor import Acceptor, AcceptorStats
from ._handoff._dispatch import Picker, WorkerInfo
from ._handoff._pool import WorkerPool
from ._handoff._worker import HandedClient, Worker
from ._kernel._authorize import (
    allow_gids,
    allow_group_members,
    allow_uids,
    root_or_same_user,
    same_user,
)
from ._kernel._blocking import ReceivedInto, recv_fds, recv_fds_into, send_fds
from ._kernel._peercred import peer_credentials
from ._kernel._unix import Authorize
from ._lifecycle._notify import notify, notify_async, watchdog_interval
from ._lifecycle._reload import Generation, start_generation
from ._lifecycle._systemd import NamedFds, listen_fds

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_FDS",
    "FRAME_HEADER_SIZE",
    "SCM_MAX_FD",
    "Acceptor",
    "AcceptorStats",
    "ActivationError",
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
    "FdNameError",
    "FdTruncatedError",
    "FdTypeError",
    "FdsInFlightError",
    "FrameDecoder",
    "Generation",
    "HandedClient",
    "Handler",
    "HandoffBusyError",
    "HandoffError",
    "HandoffTimeoutError",
    "HasFileno",
    "InvalidFdError",
    "MessageTooLargeError",
    "NamedFds",
    "NotifyError",
    "OwnedFd",
    "PeerRejectedError",
    "Picker",
    "Platform",
    "ProtocolError",
    "ReceivedInto",
    "ServerStats",
    "SocketAncillary",
    "TooManyFdsError",
    "Worker",
    "WorkerInfo",
    "WorkerPool",
    "allow_gids",
    "allow_group_members",
    "allow_uids",
    "buffer_size_for_rights",
    "connection_pair",
    "create_unix_connection",
    "create_unix_server",
    "current_platform",
    "frame_header",
    "listen_fds",
    "notify",
    "notify_async",
    "open_unix_connection",
    "peer_credentials",
    "recv_fds",
    "recv_fds_into",
    "root_or_same_user",
    "same_user",
    "send_fds",
    "start_generation",
    "start_unix_server",
    "watchdog_interval",
]
