"""PROXY protocol v2 headers from a load balancer (node.ingest.guard.read_proxy_v2), over a real socket pair.

The headers are built byte by byte from the specification (haproxy.org proxy-protocol.txt, section
2.2), not with the code under test; tests/e2e/test_two_nodes.py runs HAProxy's own.
"""

from __future__ import annotations

import socket
import struct

import pytest

from node.ingest.guard import PROXY_V2_SIGNATURE, read_proxy_v2


def header(command: int, family_proto: int, body: bytes) -> bytes:
    return PROXY_V2_SIGNATURE + bytes([0x20 | command, family_proto]) + struct.pack("!H", len(body)) + body


def read(data: bytes, *, close: bool = True) -> tuple[str, int] | None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        if close:
            a.shutdown(socket.SHUT_WR)
        return read_proxy_v2(b, 2.0)


def test_tcp4_and_tcp6_give_the_senders_address_and_leave_the_rest_unread() -> None:
    v4 = socket.inet_aton("10.1.2.3") + socket.inet_aton("10.0.0.10") + struct.pack("!HH", 40123, 11112)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header(1, 0x11, v4 + b"\x04\x00\x01x") + b"\x01\x00")  # a TLV, then the A-ASSOCIATE-RQ
        assert read_proxy_v2(b, 2.0) == ("10.1.2.3", 40123)
        assert b.recv(2) == b"\x01\x00"  # the association starts right after the header
    v6 = (
        socket.inet_pton(socket.AF_INET6, "fd00::7")
        + socket.inet_pton(socket.AF_INET6, "fd00::1")
        + struct.pack("!HH", 5000, 11112)
    )
    assert read(header(1, 0x21, v6)) == ("fd00::7", 5000)


def test_the_balancers_own_connections_are_none() -> None:
    assert read(header(0, 0x00, b"")) is None  # LOCAL: a health check with check-send-proxy
    assert read(b"") is None  # a plain connect check closes at once


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "does not start"),
        (PROXY_V2_SIGNATURE + bytes([0x11, 0x11]) + b"\x00\x0c", "does not start"),  # version 1
        (header(1, 0x11, b"\x00" * 4), "address family"),  # too short for TCP4
        (header(1, 0x31, b"/tmp/socket".ljust(216, b"\x00")), "address family"),  # AF_UNIX
        (PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 60000), "more than"),
    ],
)
def test_a_malformed_header_is_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        read(data)


def test_a_header_that_stops_midway_is_an_error_not_a_hang() -> None:
    with pytest.raises(ConnectionError):
        read(header(1, 0x11, b"\x00" * 12)[:20])
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header(1, 0x11, b"\x00" * 12)[:20])  # and the sender stays silent
        with pytest.raises(TimeoutError):
            read_proxy_v2(b, 0.3)
