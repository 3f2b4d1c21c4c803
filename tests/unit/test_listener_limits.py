"""The listener's limits without a node: buffers that grow with the bytes received, deadlines that
a trickling peer cannot stretch, the encapsulated Pixel Data walk, and the issue-16 config keys."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import ConfigError, NodeConfig, load_config
from node.receive.intake import check_encapsulated
from node.receive.listener import address_allowed
from node.receive.pdu import DeadlineExpired, SocketReader


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_declared_length_allocates_nothing(pair: tuple[socket.socket, socket.socket]) -> None:
    """A header claiming 64 MiB, then 100 bytes: the buffer holds what came, and the deadline ends the read."""
    node, peer = pair
    reader = SocketReader(node, 16 * 1024)
    reader.set_deadline("test", 0.3)
    peer.sendall(struct.pack(">BBI", 1, 0, 64 * 1024 * 1024) + bytes(100))
    head = reader.read(6)
    length = struct.unpack_from(">I", head, 2)[0]
    with pytest.raises(DeadlineExpired, match="test deadline of 0.3 s expired"):
        reader.read(length)
    assert len(reader.buf) == 16 * 1024


def test_buffer_grows_with_a_large_pdu_and_shrinks_back(pair: tuple[socket.socket, socket.socket]) -> None:
    node, peer = pair
    reader = SocketReader(node, 16 * 1024)
    reader.set_deadline("test", 5)
    big = os.urandom(300 * 1024)
    sender = threading.Thread(target=peer.sendall, args=(big + b"tail",))
    sender.start()
    assert bytes(reader.read(len(big))) == big
    assert len(reader.buf) >= len(big)
    assert bytes(reader.read(4)) == b"tail"
    sender.join(5)
    assert len(reader.buf) == 16 * 1024  # given back once the large PDU was consumed


def test_a_trickled_read_ends_at_its_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    node, peer = pair
    reader = SocketReader(node)
    reader.set_deadline("DIMSE/idle", 0.5)
    stop = threading.Event()

    def trickle() -> None:
        for _ in range(100):
            if stop.wait(0.05):
                return
            try:
                peer.send(b"x")
            except OSError:
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(DeadlineExpired):
            reader.read(1000)
    finally:
        stop.set()
        sender.join(5)
    assert time.monotonic() - started < 1.5
    assert reader.received


def _items(*fragments: bytes, delimiter: bool = True) -> bytes:
    out = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in fragments)
    return out + (struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) if delimiter else b"")


@pytest.mark.parametrize("data, problem", [
    (_items(b"", b"abcd" * 10), None),
    (_items(b"", b"abcd" * 10) + b"\x08\x00\x00\x00trailing", None),
    (_items(b"", b"abcd" * 10, delimiter=False), "no sequence delimiter"),
    (_items(b"", b"abcd" * 10)[:30], "truncated"),
    (b"\x08\x00\x16\x00" + bytes(12), "instead of an item"),
    (_items(), "no item"),
])
def test_check_encapsulated(tmp_path: Path, data: bytes, problem: str | None) -> None:
    path = tmp_path / "value"
    path.write_bytes(b"head" + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        if problem is None:
            check_encapsulated(fd, 4, len(data) + 4)
        else:
            with pytest.raises(ValueError, match=problem):
                check_encapsulated(fd, 4, len(data) + 4)
    finally:
        os.close(fd)


def test_address_allowed() -> None:
    nets = (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("::1"))
    assert address_allowed("10.1.2.3", nets)
    assert address_allowed("::ffff:10.1.2.3", nets)  # IPv4-mapped, as a dual-stack socket reports it
    assert address_allowed("::1", nets)
    assert not address_allowed("10.2.0.1", nets)
    assert not address_allowed("not-an-address", nets)


def test_listener_limit_keys(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nmax_connections = 8\nmax_connections_per_address = 2\nartim_timeout_s = 5\n'
                      'max_instance_mb = 100\ncalling_ae_addresses = { CT1 = ["10.0.0.5", "10.1.0.0/16"] }\n')
    loaded = load_config(config)
    assert (loaded.max_connections, loaded.max_connections_per_address, loaded.artim_timeout_s,
            loaded.max_instance_mb) == (8, 2, 5.0, 100)
    assert loaded.calling_ae_addresses == (("CT1", ("10.0.0.5", "10.1.0.0/16")),)
    assert NodeConfig().max_pdu_size == 16384  # finite by default (issue 16)
    for text, key in (('calling_ae_addresses = { CT1 = ["10.0.0.300"] }', "10.0.0.300"),
                      ('calling_ae_addresses = { CT1 = [] }', "calling_ae_addresses"),
                      ('calling_ae_addresses = ["CT1"]', "calling_ae_addresses"),
                      ("max_connections = 0", "max_connections"),
                      ("artim_timeout_s = 0", "artim_timeout_s"),
                      ("max_instance_mb = 0", "max_instance_mb")):
        config.write_text(f"[node]\n{text}\n")
        with pytest.raises(ConfigError, match=key):
            load_config(config)
