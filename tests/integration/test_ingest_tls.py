"""DICOM TLS: storescu +tls against the node with self-signed certificates made by openssl in the test."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node.audit import InstanceState
from tests.support.dcmtk import storescu
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir
from tests.support.tls import self_signed

pytestmark = pytest.mark.timeout(180)


def test_tls_association_with_client_certificate(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    server_key, server_cert = self_signed(tmp_path, "cxrnode")
    client_key, client_cert = self_signed(tmp_path, "storescu")
    node = node_factory(
        extra_toml=(
            f'[dicom.tls]\nenabled = true\ncert_file = "{server_cert}"\nkey_file = "{server_key}"\n'
            f'ca_file = "{client_cert}"\nrequire_client_cert = true\n'
        )
    ).start()
    path = dicom_dir() / "09_cr_8bit_alloc8.dcm"

    ok = storescu(node.port, [path], opts=["+tls", str(client_key), str(client_cert), "+cf", str(server_cert)])
    assert ok.statuses == [0x0000], ok.output[-2000:]

    anonymous = storescu(node.port, [path], opts=["+tla", "+cf", str(server_cert)])
    assert not anonymous.responses, "a client without a certificate must not get through"
    plain = storescu(node.port, [path])
    assert not plain.responses, "a plain TCP peer must not get through a TLS port"

    store = node.store()
    (inst,) = store.list_instances()
    assert inst.state == InstanceState.QUEUED
    accepted = [a for a in store.list_associations() if a.id == inst.association_id]
    assert accepted and accepted[0].tls
    assert node.stop() == 0


def test_a_silent_client_does_not_stop_the_tls_listener(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    # pynetdicom runs the TLS handshake in its accept loop, without a timeout: one TCP connection that
    # never says hello stopped every later connection. The handshake now runs on the connection's own
    # thread, within dicom.association_request_timeout_s (issue 13, finding 2).
    server_key, server_cert = self_signed(tmp_path, "cxrnode")
    node = node_factory(
        extra_toml=(
            f'association_request_timeout_s = 3\n[dicom.tls]\nenabled = true\ncert_file = "{server_cert}"\n'
            f'key_file = "{server_key}"\n'
        )
    ).start()
    client = ssl.create_default_context(cafile=str(server_cert))
    client.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", node.port), timeout=10) as silent,
        client.wrap_socket(socket.create_connection(("127.0.0.1", node.port), timeout=10)) as dripping,
    ):
        started = time.monotonic()
        dripping.sendall(b"\x01\x00\x00\x00\x00\xc8")  # TLS done, then 6 bytes of an A-ASSOCIATE-RQ
        ok = storescu(
            node.port, [dicom_dir() / "09_cr_8bit_alloc8.dcm"], opts=["+tla", "+cf", str(server_cert)], timeout=30
        )
        assert ok.statuses == [0x0000], ok.output[-2000:]
        assert time.monotonic() - started < 3
        assert silent.recv(1) == b""  # dropped at the deadline
        with contextlib.suppress(ssl.SSLError, ConnectionError):  # closed under the TLS layer: just as dropped
            assert dripping.recv(1) == b""
        assert time.monotonic() - started < 8
    # The node cuts a connection first and audits it after, so on a loaded machine the second row may come
    # a moment after the socket closed (as in test_slow_peers).
    store = node.store()
    wait_for(lambda: len(store.list_events(kinds=["connection.dropped"])) >= 2, 10, "a row for each dropped socket")
    reasons = sorted(e.detail["reason"] for e in store.list_events(kinds=["connection.dropped"]))
    assert len(reasons) == 2 and "TLS handshake failed" in reasons[0] and "not complete" in reasons[1], reasons
    assert node.stop() == 0
