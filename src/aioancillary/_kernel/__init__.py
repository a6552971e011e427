"""The kernel calls: ``sendmsg``/``recvmsg`` and their errors, peer credentials, the blocking
helpers, Unix socket files, ``authorize=`` policies and fork safety. Imports only the core."""
