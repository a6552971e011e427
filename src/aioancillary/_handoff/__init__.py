"""The hand-off toolkit: the acceptor, the worker side, the worker pool, their wire format and
dispatch policies. Built on the asyncio layer; independent of the daemon lifecycle."""
