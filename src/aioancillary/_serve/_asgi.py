"""The ``asgi`` interface: an ASGI application through uvicorn's HTTP protocol.

uvicorn serves listening sockets, not accepted connections, so this module drives the parts
of uvicorn that serve one connection (uvicorn >= 0.30, tested up to 0.55):

* ``uvicorn.Config(app, ...)`` and ``config.load()`` pick the HTTP protocol class
  (``config.http_protocol_class``: httptools or h11) and wrap the application as uvicorn
  does (ASGI 2, proxy headers);
* one ``uvicorn.server.ServerState`` shared by the connections, whose ``default_headers``
  (``date``, ``server``) are refreshed every second as ``Server.on_tick`` does;
* ``config.lifespan_class(config)`` (``LifespanOn``): lifespan startup once before the first
  client, shutdown once after the last;
* a protocol per client: ``config.http_protocol_class(config=, server_state=, app_state=,
  _loop=)``, connected with ``loop.connect_accepted_socket``.

These are uvicorn's internal names: ``tests/serve/test_internals.py`` checks each one against
the installed version. The graceful stop also uses the protocols' ``cycle``, ``pipeline``,
``app`` and ``shutdown()``, and the cycles' ``keep_alive``, ``response_started``,
``response_complete`` and ``default_headers``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from typing import Any

from .._core._errors import AppStartupError
from ._adapter import DRAIN_IDLE, ProtocolAdapter

__all__ = ["AsgiAdapter"]

logger = logging.getLogger("aioancillary.serve")

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_CLOSE = (b"connection", b"close")


def closing_app(app: _App) -> _App:
    """``app`` whose HTTP responses say ``Connection: close`` (uvicorn's protocols then close
    the connection after the response)."""

    async def closing(scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_closing(message: _Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
            await send(message)

        await app(scope, receive, send_closing)

    return closing


class AsgiAdapter(ProtocolAdapter):
    """Serves handed clients with an ASGI application, through uvicorn's HTTP protocol.

    Entering it (or [`start`][aioancillary.AsgiAdapter.start]) runs the application's lifespan
    startup; leaving it (or [`close`][aioancillary.AsgiAdapter.close]) its shutdown: once per
    worker. Needs ``aioancillary[asgi]`` (uvicorn, and httptools for ``http="httptools"``).

    Example (in a pool worker's main)::

        async with AsgiAdapter("myapp:app") as adapter:
            async with await pool_worker.connect() as worker:
                await adapter.serve(worker)

    Args:
        app: The ASGI application, or ``"module:attribute"``.
        http: ``"httptools"``, ``"h11"`` or ``"auto"`` (httptools when installed).
        lifespan: ``"auto"`` (run it if the application supports it), ``"on"`` or ``"off"``.
        timeout_keep_alive: Seconds an idle keep-alive connection stays open.
        access_log: Log every request on the ``uvicorn.access`` logger.
        drain_idle: See [`ClientAdapter`][aioancillary.ClientAdapter].
        **options: Further ``uvicorn.Config`` arguments (``root_path``, ``proxy_headers``,
            ``forwarded_allow_ips``, ``limit_concurrency``, ``ws``, ``headers``...). The
            listening and process options (``host``, ``port``, ``workers``...) do not apply.
    """

    def __init__(
        self,
        app: Any,
        *,
        http: str = "auto",
        lifespan: str = "auto",
        timeout_keep_alive: int = 5,
        access_log: bool = False,
        drain_idle: float = DRAIN_IDLE,
        **options: Any,
    ) -> None:
        super().__init__(drain_idle=drain_idle)
        self._app = app
        self._options = {
            "http": http,
            "lifespan": lifespan,
            "timeout_keep_alive": timeout_keep_alive,
            "access_log": access_log,
            "log_config": None,  # the process's logging is the caller's (uvicorn would replace it)
            **options,
        }
        self._config: Any = None
        self._state: Any = None
        self._lifespan: Any = None
        self._protocol_class: Any = None
        self._app_state: dict[str, Any] = {}
        self._ticker: asyncio.TimerHandle | None = None
        self._closing_app: _App | None = None

    async def start(self) -> None:
        """Load the application and run its lifespan startup.

        Raises:
            AppStartupError: the lifespan startup failed (uvicorn logged why).
        """
        await super().start()
        import uvicorn  # noqa: PLC0415 - optional dependency: aioancillary[asgi]
        from uvicorn.server import ServerState  # noqa: PLC0415

        config = uvicorn.Config(self._app, **self._options)
        config.load()
        self._config = config
        self._state = ServerState()
        self._protocol_class = config.http_protocol_class
        self._tick()
        self._lifespan = config.lifespan_class(config)
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            self._stop_ticker()
            raise AppStartupError(
                "the ASGI application's lifespan startup failed (its error is logged above)"
            )
        self._app_state = self._lifespan.state

    def _tick(self) -> None:
        # uvicorn's Server.on_tick: the Date header, refreshed once a second.
        config = self._config
        date = [(b"date", formatdate(time.time(), usegmt=True).encode())]
        self._state.default_headers = (date if config.date_header else []) + (
            config.encoded_headers
        )
        assert self._loop is not None
        self._ticker = self._loop.call_later(1.0, self._tick)

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def close(self) -> None:
        """Run the application's lifespan shutdown."""
        self._stop_ticker()
        await super().close()
        tasks = list(self._state.tasks) if self._state is not None else []
        if tasks:
            # Requests of connections the graceful stop aborted at its deadline (uvicorn's
            # own stop cancels them the same way, after its graceful timeout).
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5.0)
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None and not lifespan.should_exit:
            await lifespan.shutdown()

    # -- one connection -------------------------------------------------------------------------

    def _new_protocol(self) -> Any:
        return self._protocol_class(
            config=self._config,
            server_state=self._state,
            app_state=self._app_state,
            _loop=self._loop,
        )

    def _drain_protocol(self, protocol: Any) -> None:
        if not isinstance(protocol, self._protocol_class):
            # A websocket (after an upgrade): uvicorn's own graceful stop closes it (1012).
            shutdown = getattr(protocol, "shutdown", None)
            if shutdown is not None:
                shutdown()
            return
        # The next request's response says Connection: close.
        if self._closing_app is None:
            self._closing_app = closing_app(self._config.loaded_app)
        protocol.app = self._closing_app
        cycle = protocol.cycle
        if cycle is not None and not cycle.response_complete:
            # In progress: its response closes the connection (uvicorn's own graceful stop),
            # and says so if it has not started: a "connection: close" among the headers the
            # cycle adds to every response makes both protocols announce and do it.
            cycle.keep_alive = False
            if not cycle.response_started:
                cycle.default_headers = [*cycle.default_headers, _CLOSE]

    def _is_idle(self, protocol: Any) -> bool:
        if not isinstance(protocol, self._protocol_class):
            return False
        cycle = protocol.cycle
        return (cycle is None or cycle.response_complete) and not getattr(
            protocol, "pipeline", None
        )

    def _close_idle(self, protocol: Any, transport: asyncio.Transport) -> None:
        protocol.shutdown()  # idle: uvicorn closes the transport
