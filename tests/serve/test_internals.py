"""The internal names of uvicorn and aiohttp that the adapters use, checked against the
installed versions (``pyproject.toml``'s extras give the ranges these tests passed with).

A failure here means the extra's range must be narrowed, or the adapter taught the new name.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
import uvicorn
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from helpers.serve_apps import app, make_aiohttp_app
from uvicorn.server import ServerState


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 80), "peername": ("127.0.0.1", 5000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_uvicorn_serves_one_connection_through_the_names_the_adapter_uses(
    http: str,
) -> None:
    config = uvicorn.Config(app, http=http, lifespan="on", log_config=None)
    config.load()
    assert config.loaded_app is not None
    assert isinstance(config.encoded_headers, list)
    assert isinstance(config.date_header, bool)
    state = ServerState()
    assert (state.default_headers, state.tasks, state.connections) == ([], set(), set())
    lifespan = config.lifespan_class(config)
    await lifespan.startup()
    assert lifespan.should_exit is False
    assert isinstance(lifespan.state, dict)
    parameters = inspect.signature(config.http_protocol_class).parameters
    assert {"config", "server_state", "app_state", "_loop"} <= set(parameters)
    protocol: Any = config.http_protocol_class(  # type: ignore[call-arg]
        config=config,
        server_state=state,
        app_state=lifespan.state,
        _loop=asyncio.get_running_loop(),
    )
    assert protocol.app is config.loaded_app
    assert protocol.cycle is None
    if http == "httptools":
        assert not protocol.pipeline
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"GET /sleep?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
    cycle: Any = getattr(protocol, "cycle")  # noqa: B009 - mypy narrowed it to None above
    assert cycle.keep_alive is True
    assert cycle.response_started is False
    assert cycle.response_complete is False
    cycle.default_headers = [*cycle.default_headers, (b"connection", b"close")]
    cycle.keep_alive = False
    while not cycle.response_complete:
        await asyncio.sleep(0.01)
    assert b"connection: close" in transport.written.lower()
    assert transport.closed  # closed after the response
    protocol.connection_lost(None)
    idle: Any = config.http_protocol_class(
        config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
    )
    idle_transport = FakeTransport()
    idle.connection_made(idle_transport)
    idle.shutdown()  # idle: closes the transport
    assert idle_transport.closed
    idle.connection_lost(None)
    await lifespan.shutdown()


async def test_aiohttp_names() -> None:
    application = make_aiohttp_app()
    runner = web.AppRunner(application, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        handler = runner.server()  # type: ignore[misc]
        assert isinstance(handler, RequestHandler)
        assert handler._request_in_progress is False
        assert len(handler._messages) == 0
        assert callable(handler.force_close)
        response = web.Response(text="x")
        response.force_close()
        assert response.keep_alive is False
        assert application.frozen
    finally:
        await runner.cleanup()
