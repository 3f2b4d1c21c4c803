"""The DICOM listener on a hostile network: the issue-16 probes as a table, then Hypothesis fuzzing.

One node for the module, started with short deadlines. Every case ends with
the node refusing (A-ASSOCIATE-RJ, a failure status), aborting (A-ABORT) or
closing the connection (or storing a valid instance), and afterwards the node
answers a C-ECHO, leaves no ``.part`` file in its spool and logs no traceback.
The last test checks the thread count came back to its baseline.
"""

from __future__ import annotations

import struct
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.dsutils import decode, encode

from support.listener_probe import (
    ct_bytes,
    ct_dataset,
    echo_seconds,
    part_files,
    rle_ct_bytes,
    start_listener_node,
    stored_uids,
    thread_count,
)
from support.node import NodeProcess
from support.pdu import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    COMMAND,
    LAST,
    P_DATA_TF,
    RELEASE_RP,
    RawClient,
    Reply,
    announced_max_pdu,
    associate_rq,
    c_store_rq,
    p_data,
    pdu,
    pdv,
    release_rq,
    store_messages,
)
from support.pdu_strategies import DATASET_EDITS, IN_ASSOCIATION, RAW_PDUS, RQ_PDUS, edited
from support.processes import wait_for

#: The per-instance size cap the table's oversize row configures (MB), under its issue-16 key.
INSTANCE_CAP_KEY, INSTANCE_CAP_MB = "max_instance_mb", "1"
#: What the node may send on its own (PS3.8 9.3): AC, RJ, P-DATA, RELEASE-RP, ABORT.
NODE_PDU_TYPES = {ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RP, ABORT}
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class FuzzNode:
    node: NodeProcess
    keys: dict[str, str]
    baseline_threads: int

    @property
    def artim(self) -> float:
        """The deadline for association set-up this node runs with (ARTIM, else the network timeout)."""
        return float(self.keys.get("artim_timeout_s", self.keys.get("network_timeout_s", "60")))

    @property
    def pid(self) -> int:
        assert self.node.proc is not None
        return self.node.proc.pid

    def alive(self) -> bool:
        return self.node.proc is not None and self.node.proc.poll() is None


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    node, keys = start_listener_node(tmp_path_factory.mktemp("fuzz-node"),
                                     extra={INSTANCE_CAP_KEY: INSTANCE_CAP_MB})
    try:
        assert echo_seconds(node.port) is not None  # the first association starts what stays started
        yield FuzzNode(node, keys, thread_count(node.proc.pid))  # type: ignore[union-attr]  # started
    finally:
        node.stop()


def _log_offset(node: FuzzNode) -> int:
    return len(node.node.output())


def _healthy_after(node: FuzzNode, since: int, echo: bool = True) -> None:
    """The node is up, logged no traceback since ``since``, left no ``.part`` file, and answers a C-ECHO."""
    assert node.alive(), node.node.output()[-3000:]
    wait_for(lambda: not part_files(node.node.data_dir), 10, interval=0.05, what="no .part files in the spool")
    log = node.node.output()[since:]
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    if echo:
        assert echo_seconds(node.node.port) is not None


# -- the table: the probes ---------------------------------------------------------------


def _associated(port: int) -> tuple[RawClient, Reply]:
    client = RawClient(port)
    reply = client.associate()
    assert reply.types and reply.types[-1] == ASSOCIATE_AC, f"no association: {reply}"
    return client, reply


def probe_64mib_rq_then_silence(node: FuzzNode) -> Reply:
    """A 6-byte A-ASSOCIATE-RQ header claiming a 64 MiB body, then nothing."""
    with RawClient(node.node.port) as client:
        client.send(struct.pack(">BBI", ASSOCIATE_RQ, 0, 64 * 1024 * 1024))
        return client.read_until(node.artim + 3)


def probe_rq_trickled(node: FuzzNode) -> Reply:
    """A valid A-ASSOCIATE-RQ sent one byte every 0.2 s."""
    with RawClient(node.node.port) as client:
        started = time.monotonic()
        sent = client.trickle(associate_rq(), interval=0.2, until=node.artim + 3)
        reply = client.read_until(1.0)
        reply.seconds = time.monotonic() - started
        assert sent < len(associate_rq()), f"the whole trickled request was read ({reply.seconds:.1f} s)"
        return reply


def probe_unknown_pdu_first(node: FuzzNode) -> Reply:
    """PDU type 0x09 instead of an A-ASSOCIATE-RQ."""
    with RawClient(node.node.port) as client:
        client.send(pdu(0x09, bytes(8)))
        return client.read_until(node.artim + 3)


def probe_unknown_pdu_in_association(node: FuzzNode) -> Reply:
    """PDU type 0x11 after the association is accepted."""
    client, _ = _associated(node.node.port)
    with client:
        client.send(pdu(0x11, bytes(16)))
        return client.read_until(5)


def probe_pdu_over_announced_max(node: FuzzNode) -> Reply:
    """A P-DATA-TF 1000 bytes over the maximum length the A-ASSOCIATE-AC announced."""
    client, ac = _associated(node.node.port)
    with client:
        announced = announced_max_pdu(ac.first(ASSOCIATE_AC) or b"")
        assert announced, f"the node announces maximum PDU length {announced} (unlimited): issue 16 item 3"
        client.send(p_data(pdv(1, COMMAND | LAST, bytes(announced + 1000))))
        return client.read_until(5)


def probe_pdv_shorter_than_4(node: FuzzNode) -> Reply:
    """A P-DATA-TF whose 2-byte body cannot hold a PDV item length."""
    client, _ = _associated(node.node.port)
    with client:
        client.send(pdu(P_DATA_TF, b"\x00\x00"))
        return client.read_until(5)


def probe_pdv_length_below_2(node: FuzzNode) -> Reply:
    """A PDV item length of 1 (no room for context id and control header)."""
    client, _ = _associated(node.node.port)
    with client:
        client.send(pdu(P_DATA_TF, struct.pack(">IB", 1, 1)))
        return client.read_until(5)


def probe_blank_called_ae(node: FuzzNode) -> Reply:
    """An A-ASSOCIATE-RQ with a blank Called AE Title."""
    with RawClient(node.node.port) as client:
        return client.associate(called="")


def probe_command_mid_dataset(node: FuzzNode) -> Reply:
    """Part of a C-STORE dataset (one PDU, under the announced maximum), then a new C-STORE-RQ with its
    whole dataset, then release."""
    client, _ = _associated(node.node.port)
    with client:
        first, data = ct_bytes()
        client.send(p_data(pdv(3, COMMAND | LAST, c_store_rq(first, 1))))
        client.send(p_data(pdv(3, 0, data[:8000])))
        second, data2 = ct_bytes()
        for message in store_messages(3, c_store_rq(second, 2), data2):
            client.send(message)
        client.send(release_rq())
        return client.read_until(5, stop_after=(RELEASE_RP, ABORT))


def probe_bad_command_set(node: FuzzNode) -> Reply:
    """40 bytes of nonsense as a command set."""
    client, _ = _associated(node.node.port)
    with client:
        client.send(p_data(pdv(1, COMMAND | LAST, bytes(range(7, 47)))))
        return client.read_until(5, stop_after=(P_DATA_TF, ABORT))


def probe_truncated_encapsulated(node: FuzzNode) -> Reply:
    """An RLE CT whose last pixel-data fragment is cut short (no sequence delimiter)."""
    client, _ = _associated(node.node.port)
    with client:
        uid, data = rle_ct_bytes()
        cut = data[:data.rfind(b"\xfe\xff\xdd\xe0") - 1000]  # inside the last fragment, no delimiter
        for message in store_messages(5, c_store_rq(uid), cut):
            client.send(message)
        return client.read_until(10, stop_after=(P_DATA_TF, ABORT))


def probe_oversize_instance(node: FuzzNode) -> Reply:
    """A 2 MiB CT against a 1 MB per-instance cap."""
    assert INSTANCE_CAP_KEY in node.keys, f"the node has no per-instance size cap ({INSTANCE_CAP_KEY})"
    ds = ct_dataset()
    ds.Rows = ds.Columns = 1024  # 2 MiB of pixels against a 1 MB cap
    ds.PixelData = bytes(1024 * 1024 * 2)
    data = encode(ds, False, True)
    assert data is not None
    client, _ = _associated(node.node.port)
    with client:
        for message in store_messages(3, c_store_rq(str(ds.SOPInstanceUID)), data):
            if not client.send(message):
                break
        return client.read_until(10, stop_after=(P_DATA_TF, ABORT))


def ends_by_artim(node: FuzzNode, reply: Reply) -> None:
    assert reply.ended in ("closed", "stopped") or reply.aborted, f"still open after {reply.seconds:.1f} s"
    assert reply.seconds <= node.artim + 2, f"closed after {reply.seconds:.1f} s, ARTIM is {node.artim} s"


def aborts(node: FuzzNode, reply: Reply) -> None:
    assert reply.aborted, f"no A-ABORT: {reply}"


def aborts_or_closes(node: FuzzNode, reply: Reply) -> None:
    assert reply.aborted or reply.ended == "closed", f"neither A-ABORT nor close: {reply}"


def rejects_called_ae(node: FuzzNode, reply: Reply) -> None:
    # PS3.8 9.3.4: result 1 (permanent), source 1 (service user), reason 7 (called AE title not recognized)
    assert reply.rejected == (1, 1, 7), f"not rejected: {reply}"


def aborts_or_fails(node: FuzzNode, reply: Reply) -> None:
    assert reply.aborted or (reply.statuses and all(s != 0 for s in reply.statuses)), f"accepted: {reply}"


def status_in(low: int, high: int) -> Callable[[FuzzNode, Reply], None]:
    def check(node: FuzzNode, reply: Reply) -> None:
        assert reply.statuses and low <= reply.statuses[0] <= high, \
            f"status {[hex(s) for s in reply.statuses]} not in 0x{low:04X}-0x{high:04X}: {reply}"
    return check


#: (probe, what must come back): issue 16's probes, each answered as PS3.7 / PS3.8 prescribe.
TABLE: list[tuple[Callable[[FuzzNode], Reply], Callable[[FuzzNode, Reply], None]]] = [
    (probe_64mib_rq_then_silence, ends_by_artim),
    (probe_rq_trickled, ends_by_artim),
    (probe_unknown_pdu_first, aborts_or_closes),
    (probe_unknown_pdu_in_association, aborts),
    (probe_pdu_over_announced_max, aborts),
    (probe_pdv_shorter_than_4, aborts),
    (probe_pdv_length_below_2, aborts),
    (probe_blank_called_ae, rejects_called_ae),
    (probe_command_mid_dataset, aborts),
    (probe_bad_command_set, aborts_or_fails),
    (probe_truncated_encapsulated, status_in(0xC000, 0xCFFF)),
    (probe_oversize_instance, status_in(0xA700, 0xA7FF)),
]


@pytest.mark.parametrize("probe, expect", TABLE, ids=[p.__name__.removeprefix("probe_") for p, _ in TABLE])
def test_malformed_pdu_table(fuzz_node: FuzzNode, probe: Callable[[FuzzNode], Reply],
                             expect: Callable[[FuzzNode, Reply], None]) -> None:
    since = _log_offset(fuzz_node)
    reply = probe(fuzz_node)
    expect(fuzz_node, reply)
    assert set(reply.types) <= NODE_PDU_TYPES and reply.ended != "garbage", reply
    _healthy_after(fuzz_node, since)


# -- Hypothesis: PDUs, PDVs, command sets, datasets ------------------------------------------------

def _exchange(node: FuzzNode, messages: list[bytes], associate: bool) -> Reply:
    """Send the messages (after a valid association when asked), half-close, read until the node closes."""
    with RawClient(node.node.port) as client:
        if associate:
            reply = client.associate()
            assert reply.types[-1:] == [ASSOCIATE_AC], reply
        for message in messages:
            if not client.send(message):
                break
        client.finish_sending()
        return client.read_until(node.artim + 5)


def _refused_or_ended(node: FuzzNode, reply: Reply, since: int) -> None:
    assert reply.ended == "closed", f"the node kept the connection open after end of stream: {reply}"
    assert set(reply.types) <= NODE_PDU_TYPES, reply
    assert node.alive(), node.node.output()[-3000:]
    log = node.node.output()[since:]
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@FUZZ
@given(st.lists(st.one_of(RQ_PDUS, RAW_PDUS), min_size=1, max_size=3))
def test_fuzzed_pdus_before_association(fuzz_node: FuzzNode, messages: list[bytes]) -> None:
    since = _log_offset(fuzz_node)
    _refused_or_ended(fuzz_node, _exchange(fuzz_node, messages, associate=False), since)


@FUZZ
@given(IN_ASSOCIATION)
def test_fuzzed_pdus_in_association(fuzz_node: FuzzNode, messages: list[bytes]) -> None:
    since = _log_offset(fuzz_node)
    _refused_or_ended(fuzz_node, _exchange(fuzz_node, messages, associate=True), since)


@settings(FUZZ, max_examples=100)
@given(DATASET_EDITS, st.integers(1, 1 << 30))
def test_fuzzed_datasets(fuzz_node: FuzzNode, edits: list[tuple[str, int, bytes]], n: int) -> None:
    """A C-STORE of a damaged CT: a failure status, an abort, or success with the instance recorded."""
    since = _log_offset(fuzz_node)
    uid, clean = ct_bytes(f"1.2.826.0.1.3680043.10.1.16.{n}")
    data = edited(clean, edits)
    with RawClient(fuzz_node.node.port) as client:
        assert client.associate().types[-1:] == [ASSOCIATE_AC]
        for message in store_messages(3, c_store_rq(uid), data):
            client.send(message)
        reply = client.read_until(10, stop_after=(P_DATA_TF, ABORT))
        client.send(release_rq())
    assert reply.statuses or reply.aborted or reply.ended == "closed", reply
    if reply.statuses and reply.statuses[0] == 0x0000:  # stored: then recorded under the UID it names
        with warnings.catch_warnings():  # the fuzzed dataset's odd values (character sets...) are expected
            warnings.simplefilter("ignore")
            named = decode(BytesIO(data), False, True).get("SOPInstanceUID")
        assert str(named) in stored_uids(fuzz_node.node.data_dir), (named, edits)
    assert fuzz_node.alive()
    log = fuzz_node.node.output()[since:]
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_node_whole_after_fuzzing(fuzz_node: FuzzNode) -> None:
    """After every case: a C-ECHO answers, no ``.part`` file, threads back near the baseline."""
    _healthy_after(fuzz_node, 0)

    def settled() -> bool:
        return thread_count(fuzz_node.pid) <= fuzz_node.baseline_threads + 2

    wait_for(settled, 15, interval=0.1, what=f"threads back to {fuzz_node.baseline_threads} "
                                             f"(now {thread_count(fuzz_node.pid)})")
    assert echo_seconds(fuzz_node.node.port) is not None

