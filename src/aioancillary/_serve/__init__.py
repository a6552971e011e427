"""Serve applications from handed clients: adapters (ASGI, aiohttp, protocol, stream
handler) and the ``serve`` runner. Imports ``_handoff``, ``_lifecycle`` and the layers below."""
