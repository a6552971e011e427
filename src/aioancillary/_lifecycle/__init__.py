"""The daemon lifecycle: systemd socket activation, ``sd_notify`` and the fd store, and
zero-downtime reload by fd handoff. Built on the asyncio layer; independent of the hand-off
toolkit."""
