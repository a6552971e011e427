"""What a [`WorkerPool`][aioancillary.WorkerPool] worker process runs: a handler for every client,
or your own main.

The pool starts each worker as a fresh interpreter (``_pool_child``) with two inherited fds:
one end of a ``socketpair``, its link to the acceptor, and the write end of a pipe on which
it says "ready". The pool registers the link with its acceptor only once the worker is ready,
so no client is handed to a worker that is still importing, or failing to import, its code.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .._core._fd import close_raw
from ._worker import ClientHandler, Worker

__all__ = ["PoolWorker", "WorkerMain", "callable_reference", "resolve_reference"]

#: The byte a worker writes on its ready pipe once its link is up.
READY = b"R"


class PoolWorker:
    """A pool worker process's place in its [`WorkerPool`][aioancillary.WorkerPool], given to a
    ``main``.

    A ``main`` sets up what its worker needs (imports, an application, connections), then
    calls [`connect`][aioancillary.PoolWorker.connect]: the pool counts the worker as started from
    then on and its acceptor hands it clients. A ``main`` that raises, or returns, before connecting
    makes the pool's [`start`][aioancillary.WorkerPool.start] (or
    [`reload`][aioancillary.WorkerPool.reload]) fail with
    [`WorkerStartError`][aioancillary.WorkerStartError].

    Example (``myapp/worker.py``; the pool is ``WorkerPool(main="myapp.worker:main")``)::

        async def main(pool_worker: PoolWorker) -> None:
            greeting = pool_worker.args["greeting"].encode()
            async with await pool_worker.connect() as worker:
                async for client in worker:
                    with client:
                        client.sock.sendall(greeting)

    Attributes:
        index: The worker's slot in the pool (0 to ``processes - 1``; a slot keeps its index
            across restarts and reloads; slots added later get the next numbers).
        args: The pool's ``args`` (a JSON round trip of them).
    """

    def __init__(
        self,
        index: int,
        args: dict[str, Any],
        link_fd: int,
        ready_fd: int,
        shared: list[int] | None = None,
    ) -> None:
        """Made by the worker process's entry point from what the pool passed it."""
        self.index = index
        self.args = args
        self._link_fd: int | None = link_fd
        self._ready_fd = ready_fd
        self._shared: list[int] | None = list(shared or ())

    def take_shared(self) -> list[socket.socket]:
        """This worker's copies of the pool's ``share`` sockets, in the pool's order, as socket
        objects the caller owns from then on (closing them closes only this worker's copies).

        Untaken copies are closed when the worker's entry point exits.

        Raises:
            RuntimeError: called a second time.
        """
        fds = self._shared
        if fds is None:
            raise RuntimeError("PoolWorker.take_shared() was called already")
        self._shared = None
        socks: list[socket.socket] = []
        try:
            for fd in fds:
                socks.append(socket.socket(fileno=fd))
        except BaseException:
            for sock in socks:
                sock.close()
            close_raw(fds[len(socks) :])
            raise
        return socks

    async def connect(self) -> Worker:
        """Tell the pool this worker is ready and return its [`Worker`][aioancillary.Worker] (the
        link).

        Clients arrive once the pool has registered the link with its acceptor, right after
        this returns. Call it once.

        Raises:
            RuntimeError: called a second time.
        """
        fd = self._link_fd
        if fd is None:
            raise RuntimeError("PoolWorker.connect() was called already")
        self._link_fd = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
        worker = await Worker.connect(sock=sock)
        try:
            os.write(self._ready_fd, READY)
        finally:
            os.close(self._ready_fd)
        return worker

    def close(self) -> None:
        """Close what [`connect`][aioancillary.PoolWorker.connect] was not called for (the entry
        point does it on exit)."""
        if self._link_fd is not None:
            os.close(self._link_fd)
            self._link_fd = None
            os.close(self._ready_fd)
        if self._shared:
            close_raw(self._shared)
        self._shared = None

    def __repr__(self) -> str:
        state = "waiting" if self._link_fd is not None else "connected"
        return f"<PoolWorker index={self.index} {state}>"


#: ``async def main(pool_worker: PoolWorker) -> None``: a pool worker's whole life. It calls
#: [`PoolWorker.connect`][aioancillary.PoolWorker.connect] once set up and serves until its
#: acceptor ends the client stream.
WorkerMain = Callable[[PoolWorker], Awaitable[None]]


def callable_reference(target: str | Callable[..., Any], what: str = "handler") -> dict[str, str]:
    """How a child process finds ``target``: ``{"ref": "module:qualname"}``, plus ``"path"``
    when it lives in a script run as ``__main__``.

    Raises:
        ValueError: a lambda, a nested function, or a string without ``module:name``.
    """
    if isinstance(target, str):
        if ":" not in target:
            raise ValueError(f"{what} {target!r} must be 'module:function'")
        return {"ref": target}
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(
            f"{what} {target!r} cannot be found by a new process: pass a module-level "
            "async function, or 'module:function'"
        )
    if module != "__main__":
        return {"ref": f"{module}:{qualname}"}
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # run as python -m pkg.mod: importable by name
        return {"ref": f"{spec.name}:{qualname}"}
    path = getattr(main, "__file__", None)
    if path is None:
        raise ValueError(f"a {what} defined in an interactive session cannot be sent to workers")
    return {"ref": f"__main__:{qualname}", "path": os.path.abspath(path)}


def resolve_reference(reference: dict[str, str]) -> Callable[..., Any]:
    """The callable named by `callable_reference` (in the child).

    A script's callable is loaded by running the script under the name ``__mp_main__``, as
    ``multiprocessing`` does, so its ``if __name__ == "__main__":`` block does not run.

    Raises:
        ImportError, AttributeError: the module or the name does not exist.
        TypeError: the object is not callable.
    """
    module_name, _, qualname = reference["ref"].partition(":")
    if "path" in reference:
        import runpy  # noqa: PLC0415 - only for callables defined in a script

        namespace = runpy.run_path(reference["path"], run_name="__mp_main__")
        obj: Any = namespace[qualname.split(".")[0]]
        for part in qualname.split(".")[1:]:
            obj = getattr(obj, part)
    else:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{reference['ref']!r} is not callable")
    return obj  # type: ignore[no-any-return]


async def serve_handler(pool_worker: PoolWorker, handler: ClientHandler) -> None:
    """The ``main`` of a pool built with a handler: connect, then serve every client."""
    async with await pool_worker.connect() as worker:
        await worker.serve(handler)
