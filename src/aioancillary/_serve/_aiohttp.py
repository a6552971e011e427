"""The ``aiohttp`` interface: a ``web.Application`` through its ``AppRunner``.

``AppRunner(app)``, ``await runner.setup()`` (the application's ``on_startup``); then
``runner.server``, aiohttp's low-level ``web.Server``, is the protocol factory: called with no
argument it returns a ``RequestHandler`` for one connection. ``runner.cleanup()`` runs
``on_shutdown`` and ``on_cleanup``. Tested with aiohttp 3.9 to 3.14.

The graceful stop adds one ``on_response_prepare`` handler before the application is frozen
(responses prepared while stopping get ``Connection: close``) and reads two attributes of
``RequestHandler`` that aiohttp's own ``shutdown()`` relies on: ``_request_in_progress`` and
``_messages`` (requests parsed and not yet handled); ``tests/serve`` checks them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .._core._errors import AppStartupError
from ._adapter import DRAIN_IDLE, ProtocolAdapter

__all__ = ["AiohttpAdapter"]

logger = logging.getLogger("aioancillary.serve")


class AiohttpAdapter(ProtocolAdapter):
    """Serves handed clients with an aiohttp ``web.Application``.

    Entering it (or [`start`][aioancillary.AiohttpAdapter.start]) runs the application's
    ``on_startup`` handlers; leaving it (or [`close`][aioancillary.AiohttpAdapter.close]) its
    ``on_shutdown`` and ``on_cleanup``: once per worker. Needs ``aioancillary[aiohttp]``.

    Example (in a pool worker's main)::

        async with AiohttpAdapter(make_app()) as adapter:
            async with await pool_worker.connect() as worker:
                await adapter.serve(worker)

    Args:
        app: The application (not started, not frozen).
        keepalive_timeout: Seconds an idle keep-alive connection stays open (``None``:
            aiohttp's default).
        access_log: Log every request on the ``aiohttp.access`` logger.
        drain_idle: See [`ClientAdapter`][aioancillary.ClientAdapter].
        **options: Further ``web.AppRunner`` arguments (``access_log_format``, and
            ``shutdown_timeout``: how long [`close`][aioancillary.AiohttpAdapter.close] waits
            for request handlers of aborted connections before cancelling them, default 1 s).
    """

    def __init__(
        self,
        app: Any,
        *,
        keepalive_timeout: float | None = None,
        access_log: bool = False,
        drain_idle: float = DRAIN_IDLE,
        **options: Any,
    ) -> None:
        super().__init__(drain_idle=drain_idle)
        self._app = app
        # Handlers still running when the adapter closes belong to connections the graceful
        # stop aborted at its deadline: cancel them soon (aiohttp waits 60 s by default).
        self._options = {"shutdown_timeout": 1.0, **options}
        if keepalive_timeout is not None:
            self._options["keepalive_timeout"] = keepalive_timeout
        if not access_log:
            self._options["access_log"] = None
        self._runner: Any = None
        self._server: Any = None

    async def start(self) -> None:
        """Set the application up (its ``on_startup`` handlers run).

        Raises:
            AppStartupError: an ``on_startup`` handler raised (chained as ``__cause__``).
            TypeError: ``app`` is not a ``web.Application``.
            RuntimeError: the application is frozen already (started elsewhere).
        """
        await super().start()
        from aiohttp import web  # noqa: PLC0415 - optional dependency: aioancillary[aiohttp]

        app = self._app
        if not isinstance(app, web.Application):
            raise TypeError(f"the aiohttp interface needs a web.Application, got {app!r}")
        if app.frozen:
            raise RuntimeError(
                "the aiohttp application is frozen (set up by another runner): give each "
                "worker a fresh application, e.g. from a factory"
            )
        app.on_response_prepare.append(self._on_response_prepare)
        runner = web.AppRunner(app, handle_signals=False, **self._options)
        try:
            await runner.setup()
        except Exception as exc:
            await runner.cleanup()
            raise AppStartupError(f"the aiohttp application's startup failed: {exc!r}") from exc
        self._runner = runner
        self._server = runner.server

    async def close(self) -> None:
        """Run the application's ``on_shutdown`` and ``on_cleanup`` handlers."""
        await super().close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _on_response_prepare(self, request: Any, response: Any) -> None:
        if self._draining:
            # aiohttp closes the connection after this response; the header says so (3.14
            # writes its own connection header before this hook runs, older versions after).
            response.force_close()
            response.headers["Connection"] = "close"

    # -- one connection -------------------------------------------------------------------------

    def _new_protocol(self) -> Any:
        return self._server()

    def _is_idle(self, protocol: Any) -> bool:
        return not protocol._request_in_progress and not protocol._messages

    def _close_idle(self, protocol: Any, transport: asyncio.Transport) -> None:
        protocol.force_close()
