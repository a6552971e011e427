"""The hand-off wire format and the dispatch policies, without sockets."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioancillary import ProtocolError
from aioancillary._handoff import _wire as wire
from aioancillary._handoff._dispatch import LeastBusy, RoundRobin, make_policy

ipv4 = st.ip_addresses(v=4).map(str)
# As accept() reports them: inet_ntop's text form.
ipv6 = st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))
ports = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
# Paths as Python reports them: str from the filesystem (surrogate-escaped bytes included),
# bytes for Linux abstract names.
unix_paths = st.one_of(
    st.binary(max_size=107)
    .map(lambda b: b.replace(b"\0", b"x"))
    .map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary(min_size=1, max_size=107).map(lambda b: b"\0" + b),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(ipv4, ports)
def test_ipv4_address_round_trip(host: str, port: int) -> None:
    packed = wire.packer_for(socket.AF_INET)((host, port))
    assert wire.decode_address(socket.AF_INET, packed) == (host, port)


@given(ipv6, ports, u32, u32)
def test_ipv6_address_round_trip(host: str, port: int, flowinfo: int, scope: int) -> None:
    addr = (host, port, flowinfo, scope)
    packed = wire.packer_for(socket.AF_INET6)(addr)
    assert wire.decode_address(socket.AF_INET6, packed) == addr


@given(unix_paths)
def test_unix_address_round_trip(path: str | bytes) -> None:
    packed = wire.packer_for(socket.AF_UNIX)(path)
    assert wire.decode_address(socket.AF_UNIX, packed) == path


def test_unnamed_unix_client_round_trip() -> None:
    assert wire.decode_address(socket.AF_UNIX, wire.packer_for(socket.AF_UNIX)("")) == ""


def test_other_families_are_refused() -> None:
    with pytest.raises(ValueError, match="AF_INET, AF_INET6 or AF_UNIX"):
        wire.packer_for(socket.AF_PACKET)


@given(st.sampled_from([socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]), st.binary(max_size=40))
def test_address_decoding_refuses_garbage_cleanly(family: int, raw: bytes) -> None:
    try:
        addr = wire.decode_address(family, raw)
    except ProtocolError:
        return
    assert wire.packer_for(family)(addr) == raw  # what decodes is exactly what was packed


@given(
    st.integers(0, wire.MAX_LISTENERS),
    st.text(max_size=30),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)
def test_listener_announcement_round_trip(
    index: int, name: str, metadata: dict[str, object]
) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        data = wire.listener_message(index, sock, name, metadata)
        info = wire.parse_listener(data)
        # proto 0 (the family's default) comes out as what it means for an IP stream: TCP.
        assert sock.proto == 0
        assert info == (
            index,
            socket.AF_INET6,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
            name,
            metadata,
        )


def test_listener_metadata_must_be_json() -> None:
    with socket.socket() as sock, pytest.raises(TypeError):
        wire.listener_message(0, sock, "x", {"bad": object()})
    with socket.socket() as sock, pytest.raises(ValueError, match="out of range"):
        wire.listener_message(wire.MAX_LISTENERS + 1, sock, "x", {})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"L",
        b"Lnot json",
        b"L[1]",
        b'L{"id": 1}',
        b'L{"id": -1, "family": 2, "type": 1, "proto": 0, "name": "", "metadata": {}}',
        b'L{"id": 1, "family": "2", "type": 1, "proto": 0, "name": "", "metadata": {}}',
        b'L{"id": 1, "family": 2, "type": 1, "proto": 0, "name": 3, "metadata": {}}',
        b'L{"id": 1, "family": 2, "type": 1, "proto": 0, "name": "", "metadata": []}',
        b'W{"v": 1}',
    ],
)
def test_malformed_listener_announcements(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.parse_listener(data)


@given(st.integers(1, wire.MAX_DONE))
def test_done_round_trip(count: int) -> None:
    assert wire.parse_done(wire.done_message(count)) == count


@given(st.binary(max_size=12))
def test_done_parsing_refuses_garbage_cleanly(data: bytes) -> None:
    try:
        count = wire.parse_done(data)
    except ProtocolError:
        return
    assert data == wire.done_message(count)


def test_welcome_checks_the_version() -> None:
    wire.parse_welcome(wire.welcome_message())
    with pytest.raises(ProtocolError, match="version 2"):
        wire.parse_welcome(b"W" + json.dumps({"v": 2}).encode())
    for bad in (b"", b"W", b"Wnull", b"X{}"):
        with pytest.raises(ProtocolError):
            wire.parse_welcome(bad)


addresses = st.one_of(
    st.tuples(st.just(socket.AF_INET), st.tuples(ipv4, ports)),
    st.tuples(st.just(socket.AF_INET6), st.tuples(ipv6, ports, u32, u32)),
    st.tuples(st.just(socket.AF_UNIX), unix_paths),
)


@given(st.lists(st.tuples(st.integers(0, wire.MAX_LISTENERS), addresses), min_size=1, max_size=40))
def test_client_message_round_trip(clients: list[tuple[int, tuple[int, object]]]) -> None:
    records = [wire.record_packer(index, family)(addr) for index, (family, addr) in clients]
    parsed = wire.client_records(wire.client_message(records))
    assert [index for index, _raw in parsed] == [index for index, _client in clients]
    families = [family for _index, (family, _addr) in clients]
    decoded = [wire.decode_address(f, raw) for f, (_i, raw) in zip(families, parsed, strict=True)]
    assert decoded == [addr for _index, (_family, addr) in clients]


@given(st.binary(max_size=40))
def test_client_message_parsing_refuses_garbage_cleanly(tail: bytes) -> None:
    try:
        records = wire.client_records(b"C" + tail)
    except ProtocolError:
        return
    rebuilt = [i.to_bytes(2, "big") + len(raw).to_bytes(1, "big") + raw for i, raw in records]
    assert wire.client_message(rebuilt) == b"C" + tail


def test_client_message_edge_cases() -> None:
    for bad in (b"", b"C", b"X\x00\x00\x00", b"C\x00\x00", b"C\x00\x00\x02\x00"):
        with pytest.raises(ProtocolError):
            wire.client_records(bad)
    assert wire.client_records(b"C\x00\x01\x00") == [(1, b"")]
    with pytest.raises(ValueError, match="out of range"):
        wire.record_packer(wire.MAX_LISTENERS + 1, socket.AF_INET)


# -- dispatch policies ----------------------------------------------------------------------


@dataclass
class FakeWorker:
    name: str
    in_flight: int = 0
    cap: int = 2
    index: int = 0
    pid: int | None = None
    limit: int = 2
    handed: int = 0
    completed: int = 0


def test_least_busy_takes_the_least_loaded_worker() -> None:
    workers = [FakeWorker("a", 2, 4), FakeWorker("b", 1, 4), FakeWorker("c", 3, 4)]
    policy = LeastBusy()
    for _ in range(5):
        assert policy.pick(workers) is workers[1]


def test_least_busy_spreads_ties_and_skips_full_workers() -> None:
    workers = [FakeWorker("a"), FakeWorker("b"), FakeWorker("c", cap=0)]
    policy = LeastBusy()
    picks = [policy.pick(workers) for _ in range(6)]
    assert {w.name for w in picks if w} == {"a", "b"}
    workers[0].in_flight = workers[1].in_flight = 2
    assert policy.pick(workers) is None
    assert LeastBusy().pick([]) is None
    single = [FakeWorker("s", 1, 1)]
    assert LeastBusy().pick(single) is None
    single[0].in_flight = 0
    assert LeastBusy().pick(single) is single[0]


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=8))
def test_least_busy_never_picks_a_full_or_busier_worker(loads: list[tuple[int, int]]) -> None:
    workers = [FakeWorker(str(i), n, cap) for i, (n, cap) in enumerate(loads)]
    chosen = LeastBusy().pick(workers)
    open_ = [w for w in workers if w.in_flight < w.cap]
    if not open_:
        assert chosen is None
    else:
        assert chosen is not None
        assert chosen.in_flight == min(w.in_flight for w in open_)
        assert chosen.in_flight < chosen.cap


def test_round_robin_goes_round_and_skips_full_workers() -> None:
    workers = [FakeWorker("a"), FakeWorker("b"), FakeWorker("c")]
    policy = RoundRobin()
    assert [policy.pick(workers).name for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]
    workers[1].cap = 0
    assert [policy.pick(workers).name for _ in range(3)] == ["c", "a", "c"]  # type: ignore[union-attr]
    for w in workers:
        w.cap = 0
    assert policy.pick(workers) is None
    assert RoundRobin().pick([]) is None


def test_round_robin_survives_a_shrinking_list() -> None:
    workers = [FakeWorker("a"), FakeWorker("b"), FakeWorker("c")]
    policy = RoundRobin()
    policy.pick(workers)
    policy.pick(workers)
    policy.pick(workers)
    assert policy.pick(workers[:1]) is workers[0]


def test_policy_names() -> None:
    assert isinstance(make_policy("least-busy"), LeastBusy)
    assert isinstance(make_policy("round-robin"), RoundRobin)
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        make_policy("random")


async def test_dispatch_names_are_typed_and_checked() -> None:
    from aioancillary import Acceptor, DispatchName, WorkerPool  # noqa: PLC0415

    assert set(get_args(DispatchName)) == {"least-busy", "round-robin"}
    for name in get_args(DispatchName):
        Acceptor(dispatch=name).close()
    # A typo is a type error (mypy --strict checks this file: an ignore that is not needed is
    # an error itself) and a ValueError at run time, naming the valid choices.
    with pytest.raises(ValueError, match="'least-busy', 'round-robin' or a picker"):
        Acceptor(dispatch="least_busy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown dispatch policy 'fastest'"):
        WorkerPool("helpers.pool_handlers:handle", processes=1, dispatch="fastest")  # type: ignore[arg-type]
