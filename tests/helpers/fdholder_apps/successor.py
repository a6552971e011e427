"""A successor holder that dies in the middle of a takeover, for the takeover tests.

``successor.py PATH LOOP STEP`` follows a new holder's steps (``_fdholder._takeover``) on the
event loop LOOP and exits with ``os._exit(3)`` (no cleanup, as if killed) right after STEP:

* ``offer``: the running holder has frozen and offered its store;
* ``fds``: the generation handoff has moved the listener and every entry's fds here;
* ``ready``: this process has declared itself ready (the generation's commit point) but never
  says ``bye``;
* ``wait``: as ``fds``, then waits for a line on stdin before dying;
* ``nonsense``: as ``fds``, then gives the generation up and answers the offer with something
  else than ``bye``, and dies once the running holder has closed the takeover request.

Before dying it prints one JSON line: ``{"step": STEP, "entries": [...], "fds": N}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

from aioancillary import AncillaryError
from aioancillary._core._fd import OwnedFd, close_all
from aioancillary._fdholder._takeover import LISTENER, adopt, open_generation, request_takeover
from aioancillary._fdholder._wire import encode


def die(step: str, **fields: object) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)
    os._exit(3)


async def main(path: str, step: str) -> None:
    offer = await request_takeover(path, step=10.0, deadline=10.0)
    assert offer is not None, "no holder serves there"
    names = [entry.name for entry in offer.entries]
    if step == "offer":
        die(step, entries=names)
    gen = await open_generation(path, 10.0)
    held: list[OwnedFd] = []
    adopt(offer, gen.inherited, lambda name, fds, expires_in: held.extend(fds))
    listener = gen.take_socket(LISTENER)
    if step == "fds":
        die(step, entries=names, fds=len(held))
    if step == "nonsense":
        await gen.close()  # first: the running holder may replace its generation right after
        await offer.conn.send(encode("list"))
        with contextlib.suppress(AncillaryError):
            while True:
                (await offer.conn.recv()).close()
        die(step, entries=names, fds=len(held))
    if step == "wait":
        print(json.dumps({"step": "waiting", "entries": names}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        die(step, entries=names, fds=len(held))
    await gen.ready()
    if step == "ready":
        die(step, entries=names, fds=len(held))
    close_all(held)
    listener.close()
    raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    path, loop, step = sys.argv[1:4]
    if loop == "uvloop":
        import uvloop

        uvloop.run(main(path, step))
    else:
        asyncio.run(main(path, step))
