"""The asyncio layer: the transport (reading, writing), protocols, connections, the client and
server entry points. Imports the kernel layer and the core."""
