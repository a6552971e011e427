"""The sans-I/O core: fd ownership, control-message building and parsing, stream framing, the
send queue's bookkeeping and received messages. No sockets are opened, no event loop is used;
it imports nothing from the other layers."""
