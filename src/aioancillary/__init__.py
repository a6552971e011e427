"""aioancillary: leak-proof, asyncio-native file-descriptor passing over Unix sockets.

One private folder per layer, bottom up; each imports only the ones below it (a test checks
it): ``_core`` (sans-I/O), ``_kernel`` (system calls, blocking helpers, socket files),
``_asyncio`` (transport, connection, servers), then ``_handoff`` and ``_lifecycle``, then
``_serve`` and ``_fdholder``, and ``_tools`` (the command line). Everything public is
re-exported here. What each layer offers:

* sans-I/O core: [`OwnedFd`][aioancillary.OwnedFd],
  [`AncillaryMessage`][aioancillary.AncillaryMessage],
  [`SocketAncillary`][aioancillary.SocketAncillary], [`FrameDecoder`][aioancillary.FrameDecoder] (no
  sockets);
* blocking helpers: [`send_fds`][aioancillary.send_fds], [`recv_fds`][aioancillary.recv_fds],
  [`recv_fds_into`][aioancillary.recv_fds_into];
* asyncio: [`AncillaryConnection`][aioancillary.AncillaryConnection] with
  [`open_unix_connection`][aioancillary.open_unix_connection],
  [`start_unix_server`][aioancillary.start_unix_server],
  [`connection_pair`][aioancillary.connection_pair]; and, for your own protocols,
  [`AncillaryTransport`][aioancillary.AncillaryTransport] /
  [`AncillaryProtocol`][aioancillary.AncillaryProtocol] with
  [`create_unix_connection`][aioancillary.create_unix_connection] and
  [`create_unix_server`][aioancillary.create_unix_server];
* ``authorize=`` policies: [`same_user`][aioancillary.same_user],
  [`root_or_same_user`][aioancillary.root_or_same_user], [`allow_uids`][aioancillary.allow_uids],
  [`allow_gids`][aioancillary.allow_gids],
  [`allow_group_members`][aioancillary.allow_group_members];
* daemon lifecycle: [`listen_fds`][aioancillary.listen_fds] (systemd socket activation, by name, as
  [`NamedFds`][aioancillary.NamedFds]), [`notify`][aioancillary.notify] /
  [`notify_async`][aioancillary.notify_async] (``sd_notify``, the fd store),
  [`start_generation`][aioancillary.start_generation] / [`Generation`][aioancillary.Generation]
  (zero-downtime reload by fd handoff), [`spawn_with_fds`][aioancillary.spawn_with_fds] (start any
  program with named fds, as systemd does), and [`ConnectionServer`][aioancillary.ConnectionServer],
  an accept loop that tracks its connections, stops accepting and drains with a deadline;
* the fd holder (``python -m aioancillary fdholder``), a daemon that keeps fds across restarts,
  and its clients [`FdHolderClient`][aioancillary.FdHolderClient] /
  [`FdHolderBlockingClient`][aioancillary.FdHolderBlockingClient];
* hand-off toolkit: [`Acceptor`][aioancillary.Acceptor] hands accepted clients to worker processes
  running [`Worker`][aioancillary.Worker] (clients arrive as
  [`HandedClient`][aioancillary.HandedClient]); [`WorkerPool`][aioancillary.WorkerPool] starts and
  restarts such workers, each running a handler or a main of yours
  ([`PoolWorker`][aioancillary.PoolWorker]);
* serving applications from handed clients: [`AsgiAdapter`][aioancillary.AsgiAdapter] (through
  uvicorn), [`AiohttpAdapter`][aioancillary.AiohttpAdapter],
  [`ProtocolAdapter`][aioancillary.ProtocolAdapter], [`StreamAdapter`][aioancillary.StreamAdapter];
  and the runner, ``python -m aioancillary serve``.
"""

from __future__ import annotations

from ._asyncio._accept_loop import ConnectionServer, ConnectionServerStats
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
    AppStartupError,
    CloexecError,
    ConnectionClosedError,
    DataTruncatedError,
    FdHolderError,
    FdHolderExistsError,
    FdHolderFullError,
    FdHolderNotFoundError,
    FdHolderRefusedError,
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
    SpawnError,
    TooManyFdsError,
    WorkerStartError,
)
from ._core._fd import FdLike, HasFileno, OwnedFd
from ._core._framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, FrameDecoder, frame_header
from ._core._message import AncillaryMessage
from ._core._platform import SCM_MAX_FD, Platform, buffer_size_for_rights, current_platform
from ._core._version import __version__ as __version__
from ._fdholder._blocking import FdHolderBlockingClient
from ._fdholder._client import FdHolderClient
from ._fdholder._wire import FdHolderEntry
from ._handoff._acceptor import Acceptor, AcceptorStats
from ._handoff._client import HandedClient
from ._handoff._dispatch import DispatchName, Picker, WorkerInfo
from ._handoff._pool import WorkerPool
from ._handoff._pool_worker import PoolWorker, WorkerMain
from ._handoff._worker import Worker
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
from ._lifecycle._spawn import spawn_with_fds
from ._lifecycle._systemd import NamedFds, listen_fds
from ._serve._adapter import ClientAdapter, ProtocolAdapter
from ._serve._aiohttp import AiohttpAdapter
from ._serve._asgi import AsgiAdapter
from ._serve._streams import StreamAdapter, StreamHandler

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_FDS",
    "FRAME_HEADER_SIZE",
    "SCM_MAX_FD",
    "Acceptor",
    "AcceptorStats",
    "ActivationError",
    "AiohttpAdapter",
    "AncillaryConnection",
    "AncillaryError",
    "AncillaryMessage",
    "AncillaryProtocol",
    "AncillaryServer",
    "AncillaryTransport",
    "AppStartupError",
    "AsgiAdapter",
    "Authorize",
    "ClientAdapter",
    "CloexecError",
    "ConnectionClosedError",
    "ConnectionServer",
    "ConnectionServerStats",
    "Credentials",
    "DataTruncatedError",
    "DispatchName",
    "FdHolderBlockingClient",
    "FdHolderClient",
    "FdHolderEntry",
    "FdHolderError",
    "FdHolderExistsError",
    "FdHolderFullError",
    "FdHolderNotFoundError",
    "FdHolderRefusedError",
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
    "PoolWorker",
    "ProtocolAdapter",
    "ProtocolError",
    "ReceivedInto",
    "ServerStats",
    "SocketAncillary",
    "SpawnError",
    "StreamAdapter",
    "StreamHandler",
    "TooManyFdsError",
    "Worker",
    "WorkerInfo",
    "WorkerMain",
    "WorkerPool",
    "WorkerStartError",
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
    "spawn_with_fds",
    "start_generation",
    "start_unix_server",
    "watchdog_interval",
]
