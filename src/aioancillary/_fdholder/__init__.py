"""The fd holder (rank 4): a daemon that keeps fds for other processes, and its clients."""
