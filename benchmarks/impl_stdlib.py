"""stdlib, blocking: ``socket.send_fds`` / ``socket.recv_fds``, one call per message."""

from __future__ import annotations

import array
import os
import socket
import time

from _common import MSG_SIZE, PAYLOAD, Job, open_devnull, write_latencies


def _recv_exact(sock: socket.socket, nfds: int) -> int:
    """One 16-byte message; its fds are closed. Returns the number of fds."""
    got = 0
    nrecv = 0
    while got < MSG_SIZE:
        data, fds, _flags, _addr = socket.recv_fds(sock, MSG_SIZE - got, nfds)
        if not data:
            raise EOFError("unexpected EOF")
        for fd in fds:
            os.close(fd)
        got += len(data)
        nrecv += len(fds)
    return nrecv


def send(job: Job) -> None:
    fd = open_devnull()
    fds = [fd] * job.nfds
    sock = job.sock
    job.ctrl.ready()
    job.ctrl.expect("go")
    for _ in range(job.n):
        socket.send_fds(sock, [PAYLOAD], fds)
    job.ctrl.finish()
    os.close(fd)


def recv(job: Job) -> None:
    sock, nfds = job.sock, job.nfds
    total = job.n * MSG_SIZE
    got = nrecv = 0
    recv_fds, close = socket.recv_fds, os.close
    job.ctrl.ready()
    while got < total:
        data, fds, _flags, _addr = recv_fds(sock, MSG_SIZE, nfds)
        if not data:
            raise EOFError("unexpected EOF")
        for fd in fds:
            close(fd)
        got += len(data)
        nrecv += len(fds)
    job.ctrl.done_active(got // MSG_SIZE, nrecv)


def ping(job: Job) -> None:
    fd = open_devnull()
    sock = job.sock
    lat = array.array("q", bytes(8 * job.n))
    nrecv = 0
    clock = time.perf_counter_ns
    job.ctrl.ready()
    job.ctrl.expect("go")
    for i in range(job.n):
        t = clock()
        socket.send_fds(sock, [PAYLOAD], [fd])
        nrecv += _recv_exact(sock, 1)
        lat[i] = clock() - t
    t_end = time.monotonic_ns()
    write_latencies(job.latfile, lat)
    job.ctrl.done_active(job.n, nrecv, t_end)
    os.close(fd)


def pong(job: Job) -> None:
    fd = open_devnull()
    sock = job.sock
    job.ctrl.ready()
    for _ in range(job.n):
        _recv_exact(sock, 1)
        socket.send_fds(sock, [PAYLOAD], [fd])
    job.ctrl.finish()
    os.close(fd)


def accept(job: Job) -> None:
    assert job.listener is not None
    listener, sock = job.listener, job.sock
    job.ctrl.ready()
    for _ in range(job.n):
        conn, _addr = listener.accept()
        socket.send_fds(sock, [PAYLOAD], [conn.fileno()])
        conn.close()
    job.ctrl.finish()


ROLES = {"send": send, "recv": recv, "ping": ping, "pong": pong, "accept": accept}
