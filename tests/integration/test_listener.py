"""The listener's refusals, each with the right DICOM status, and a node that keeps serving."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from support.data import DATA, abdomen_files
from support.dcmtk import dcmtk, storescu
from support.listener_probe import ct_bytes, ct_dataset, rle_ct_bytes
from support.pdu import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RQ,
    COMMAND,
    LAST,
    P_DATA_TF,
    RawClient,
    announced_max_pdu,
    associate_rq,
    c_store_rq,
    p_data,
    pdu,
    pdv,
    store_messages,
)
from support.processes import wait_for

CT_SMALL = DATA / "single-slices" / "CT_small.dcm"


def _scu_store(port: int, path_or_ds, sop_class=CTImageStorage, calling: str = "MODALITY", raw: bool = False
               ) -> int | None:
    """C-STORE with pynetdicom as the SCU; returns the status (None: no association).

    ``raw`` sends a file's bytes as they are, without parsing them first, so
    that a corrupt dataset reaches the node.
    """
    if raw:
        _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return _scu_store_once(port, path_or_ds, sop_class, calling)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _scu_store_once(port: int, path_or_ds, sop_class, calling: str) -> int | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path_or_ds)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


@pytest.fixture
def node(start_node):
    return start_node()


def _ct_copy(tmp_path: Path, name: str) -> tuple[pydicom.Dataset, Path]:
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def test_valid_ct_is_stored_durably(node, tmp_path: Path) -> None:
    ds, path = _ct_copy(tmp_path, "ok.dcm")
    assert _scu_store(node.port, path) == 0x0000
    stored = list((node.data_dir / "spool").rglob(f"{ds.SOPInstanceUID}.dcm"))
    assert len(stored) == 1
    # Byte for byte what was sent (the dataset part; the file meta is the node's).
    assert pydicom.dcmread(stored[0]).PixelData == ds.PixelData
    # A duplicate is harmless.
    assert _scu_store(node.port, path) == 0x0000
    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 1


def test_non_ct_sop_class_refused_with_0122(node) -> None:
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    assert _scu_store(node.port, ds, sop_class=MRImageStorage) == 0x0122
    assert "SOP class" in node.output() and "0x0122" in node.output()
    assert _echo_ok(node.port)


def test_corrupt_dataset_refused_and_node_keeps_serving(node, tmp_path: Path) -> None:
    _, path = _ct_copy(tmp_path, "truncated.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])  # pixel data cut short
    assert _scu_store(node.port, path, raw=True) == 0xC000

    _, garbage = _ct_copy(tmp_path, "garbage.dcm")
    raw = bytearray(garbage.read_bytes())
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, group length element
    raw[meta_end + 40 : meta_end + 400] = bytes(range(256)) + bytes(104)
    garbage.write_bytes(bytes(raw))
    assert _scu_store(node.port, garbage, raw=True) == 0xC000

    assert "cannot be parsed" in node.output()
    assert not list((node.data_dir / "spool").rglob("*.dcm"))
    # Still serving: echo and a valid store both work.
    assert _echo_ok(node.port)
    _, ok = _ct_copy(tmp_path, "ok.dcm")
    assert _scu_store(node.port, ok) == 0x0000


def test_sop_class_mismatch_refused(node, tmp_path: Path) -> None:
    """An MR dataset sent on a CT presentation context (file meta says CT) gets 0xA900."""
    ds, path = _ct_copy(tmp_path, "mismatch.dcm")
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.save_as(path, enforce_file_format=False)  # keep the (now inconsistent) file meta as set
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert _scu_store(node.port, path, raw=True) == 0xA900


def test_calling_ae_allow_list(start_node, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nallowed_calling_ae_titles = ["MODALITY"]\n')
    node = start_node("--config", str(config))
    files = abdomen_files()[:3]
    refused = storescu(node.port, files, calling="STRANGER")
    assert refused.returncode != 0
    # The node logs the rejection after it has sent the A-ASSOCIATE-RJ that ended storescu.
    node.wait_for_line("rejected", "STRANGER")
    accepted = storescu(node.port, files, calling="MODALITY")
    assert accepted.returncode == 0, accepted.stderr
    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 3


def test_wrong_called_ae_refused(node) -> None:
    result = storescu(node.port, abdomen_files()[:1], called="SOMEONEELSE")
    assert result.returncode != 0
    assert not (node.data_dir / "spool").exists() or not list((node.data_dir / "spool").rglob("*.dcm"))


def test_series_list_shows_rejection_reason(start_node, tmp_path: Path) -> None:
    """A series with a missing slice is rejected with the reason, visible from the CLI."""
    node = start_node("--quiet-seconds", "1")
    files = abdomen_files()
    sent = storescu(node.port, files[:50] + files[51:])
    assert sent.returncode == 0, sent.stderr
    def listing() -> str:
        out = subprocess.run([sys.executable, "-m", "node", "series", "list", "--data-dir", str(node.data_dir)],
                             capture_output=True, text=True, timeout=60).stdout
        return out if "rejected" in out else ""

    out = wait_for(listing, 60, what="series rejected")
    assert "missing slices" in out


def test_compressed_transfer_syntaxes_stored_byte_for_byte(node, tmp_path: Path) -> None:
    """JPEG lossless and RLE files made by DCMTK from the real series arrive unchanged."""
    source = abdomen_files()[0]
    jpeg = tmp_path / "jpeg-lossless.dcm"
    rle = tmp_path / "rle.dcm"
    for tool, out in (("dcmcjpeg", jpeg), ("dcmcrle", rle)):
        made = subprocess.run([dcmtk(tool), str(source), str(out)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    # Each file keeps its own instance in the spool: give them distinct SOP Instance UIDs.
    files = []
    for i, path in enumerate((jpeg, rle)):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1.{i + 1}"
        ds.save_as(tmp_path / f"send-{i}.dcm", enforce_file_format=True)
        files.append(tmp_path / f"send-{i}.dcm")
    # storescu offers only uncompressed syntaxes unless told: -xs proposes JPEG
    # lossless SV1, -xr RLE (otherwise it would have to decompress).
    for path, option in zip(files, ("-xs", "-xr")):
        sent = storescu(node.port, [path], extra=[option])
        assert sent.returncode == 0, sent.stderr
    for path in files:
        ds = pydicom.dcmread(path)
        stored, = (node.data_dir / "spool").rglob(f"{ds.SOPInstanceUID}.dcm")
        back = pydicom.dcmread(stored)
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert back.file_meta.TransferSyntaxUID.is_compressed
        assert back.PixelData == ds.PixelData
        assert back.pixel_array.shape == ds.pixel_array.shape  # decodable by the node's pydicom plugins


# -- issue 16: admission, deadlines, PDU size, malformed input, AE bound to addresses ----------------


def _limits_node(start_node, tmp_path: Path, **keys: object):
    """A node with ``[node]`` keys (short deadlines by default) for the hostile-network tests."""
    settings = {"artim_timeout_s": 1.0, "network_timeout_s": 2.0, **keys}
    config = tmp_path / "limits.toml"
    config.write_text("[node]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return start_node("--config", str(config))


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def _is_closed(sock: socket.socket) -> bool:
    """Whether the node has closed ``sock`` (end of stream or reset), without waiting."""
    sock.setblocking(False)
    try:
        return not sock.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_connection_flood_is_bounded_and_echo_still_answers(start_node, tmp_path: Path) -> None:
    """100 idle connections from one address: 16 stay open (the oldest make room for the newest, never more
    threads), a C-ECHO from another address answers at once, and ARTIM ends the 16."""
    node = _limits_node(start_node, tmp_path, max_connections_per_address=16, max_connections=64,
                        artim_timeout_s=3.0)
    assert node.proc is not None
    pid = node.proc.pid
    assert _echo_ok(node.port)
    baseline = _threads(pid)
    flood = []
    try:
        for _ in range(100):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))  # another loopback address: the per-address cap applies to it alone
            sock.connect(("127.0.0.1", node.port))
            sock.sendall(struct.pack(">BBI", ASSOCIATE_RQ, 0, 64 * 1024 * 1024)[:5])  # a header, never finished
            flood.append(sock)
            assert _threads(pid) <= baseline + 16 + 16 + 1  # admitted, and closed ones still ending
        node.wait_for_line("making room for 127.0.0.2 (max_connections_per_address)")
        started = time.monotonic()
        assert _echo_ok(node.port)  # another address: admitted
        assert time.monotonic() - started <= 2.0
        wait_for(lambda: sum(map(_is_closed, flood)) >= 84, 5, interval=0.05, what="84 connections closed")
        assert not any(_is_closed(s) for s in flood[-16:]) or sum(map(_is_closed, flood)) == 100
        wait_for(lambda: _threads(pid) <= baseline + 16 + 1, 5, interval=0.05, what="threads bounded by the cap")
        wait_for(lambda: all(map(_is_closed, flood)), 3.0 + 3.0, interval=0.1, what="ARTIM closing the rest")
        node.wait_for_line("ARTIM (association request)")
    finally:
        for sock in flood:
            sock.close()
    # + 2: the node may start a thread of its own meanwhile (the fuzz suite allows the same)
    wait_for(lambda: _threads(pid) <= baseline + 2, 10, interval=0.1, what=f"threads back near {baseline}")


def test_slowloris_association_request_closed_by_artim(start_node, tmp_path: Path) -> None:
    node = _limits_node(start_node, tmp_path, artim_timeout_s=1.0)
    with RawClient(node.port) as client:
        started = time.monotonic()
        sent = client.trickle(associate_rq(), interval=0.2, until=6.0)
        seconds = time.monotonic() - started
    assert sent < len(associate_rq()) and seconds <= 1.0 + 1.5, (sent, seconds)
    log = node.wait_for_line("closed", "ARTIM (association request) deadline of 1.0 s expired")
    assert "Traceback" not in log


def test_pdu_type_and_size_checked_before_the_body(start_node, tmp_path: Path) -> None:
    """Oversize A-ASSOCIATE-RQ, unknown PDU type, P-DATA over the announced maximum: A-ABORT (PS3.8 9.3.8)."""
    node = _limits_node(start_node, tmp_path, max_pdu_size=16384)
    with RawClient(node.port) as client:  # 64 MiB claimed: aborted on the header, nothing allocated
        client.send(struct.pack(">BBI", ASSOCIATE_RQ, 0, 64 * 1024 * 1024))
        reply = client.read_until(5)
    assert reply.first(ABORT) == bytes([0, 0, 2, 6]), reply
    with RawClient(node.port) as client:
        client.send(pdu(0x09, bytes(8)))
        reply = client.read_until(5)
    assert reply.first(ABORT) == bytes([0, 0, 2, 1]), reply  # reason 1: unrecognized PDU
    with RawClient(node.port) as client:
        ac = client.associate()
        assert announced_max_pdu(ac.first(ASSOCIATE_AC) or b"") == 16384
        client.send(pdu(P_DATA_TF, b"", length=16385))
        reply = client.read_until(5)
    assert reply.first(ABORT) == bytes([0, 0, 2, 6]), reply
    log = node.wait_for_line("exceeds the maximum of 16384")
    assert "Traceback" not in log and "internal error" not in log


def test_short_pdv_and_blank_called_ae_are_protocol_events(start_node, tmp_path: Path) -> None:
    node = _limits_node(start_node, tmp_path)
    with RawClient(node.port) as client:
        assert client.associate().types[-1:] == [ASSOCIATE_AC]
        client.send(pdu(P_DATA_TF, b"\x00\x00"))
        reply = client.read_until(5)
    assert reply.first(ABORT) == bytes([0, 0, 2, 6]), reply
    with RawClient(node.port) as client:
        reply = client.associate(called="")
    assert reply.rejected == (1, 1, 7), reply
    log = node.wait_for_line("rejected", "called AE title ''")
    node.wait_for_line("aborted", "presentation data value item of 2 bytes")
    assert "Traceback" not in log and "internal error" not in log and "struct.error" not in log
    assert _echo_ok(node.port)


def test_command_mid_dataset_aborts_and_leaves_no_part_file(start_node, tmp_path: Path) -> None:
    node = _limits_node(start_node, tmp_path)
    with RawClient(node.port) as client:
        assert client.associate().types[-1:] == [ASSOCIATE_AC]
        uid, data = ct_bytes()
        client.send(p_data(pdv(3, COMMAND | LAST, c_store_rq(uid, 1))))
        client.send(p_data(pdv(3, 0, data[:8000])))  # a first fragment, well under the maximum PDU
        client.send(p_data(pdv(3, COMMAND | LAST, c_store_rq(uid, 2))))
        reply = client.read_until(5, stop_after=(ABORT,))
    assert reply.aborted, reply
    log = node.wait_for_line("association from FUZZER", "aborted after")
    assert "before the dataset of the previous one was complete" in log and "Traceback" not in log
    assert not list(node.data_dir.rglob("*.part"))


def test_instance_over_max_instance_mb_refused_with_a700(start_node, tmp_path: Path) -> None:
    node = _limits_node(start_node, tmp_path, max_instance_mb=1)
    ds = ct_dataset()
    ds.Rows = ds.Columns = 1024  # 2 MiB of pixels against a 1 MiB cap
    ds.PixelData = bytes(2 * 1024 * 1024)
    data = encode(ds, False, True)
    assert data is not None
    with RawClient(node.port) as client:
        assert client.associate().types[-1:] == [ASSOCIATE_AC]
        for message in store_messages(3, c_store_rq(str(ds.SOPInstanceUID)), data):
            assert client.send(message)
        reply = client.read_until(10, stop_after=(P_DATA_TF, ABORT))
        assert reply.statuses == [0xA700], reply
        # The association goes on: the rest was read and discarded, not stored.
        uid, small = ct_bytes()
        for message in store_messages(3, c_store_rq(uid, 2), small):
            client.send(message)
        assert client.read_until(10, stop_after=(P_DATA_TF,)).statuses == [0x0000]
    node.wait_for_line("0xA700", "max_instance_mb")
    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 1


def test_truncated_encapsulated_pixel_data_refused_with_c000(start_node, tmp_path: Path) -> None:
    """Cut before the sequence delimiter (pydicom reads that leniently) or inside a fragment: 0xC000."""
    node = _limits_node(start_node, tmp_path)
    with RawClient(node.port) as client:
        assert client.associate().types[-1:] == [ASSOCIATE_AC]
        for message_id, cut in ((1, lambda d: d[:d.rfind(b"\xfe\xff\xdd\xe0")]),  # no sequence delimiter
                                (2, lambda d: d[:d.rfind(b"\xfe\xff\xdd\xe0") - 100]),  # inside a fragment
                                (3, lambda d: d)):
            uid, data = rle_ct_bytes()
            for message in store_messages(5, c_store_rq(uid, message_id), cut(data)):
                client.send(message)
            status = 0x0000 if message_id == 3 else 0xC000  # the whole one is stored
            assert client.read_until(10, stop_after=(P_DATA_TF,)).statuses == [status], message_id
    log = node.wait_for_line("0xC000")
    assert log.count("instance refused (0xC000)") == 2 and "Traceback" not in log


def test_dimse_deadline_covers_a_trickled_pdu(start_node, tmp_path: Path) -> None:
    """``network_timeout_s`` is a whole-PDU deadline: one byte every 0.2 s does not keep it open."""
    node = _limits_node(start_node, tmp_path, network_timeout_s=1.0)
    with RawClient(node.port) as client:
        assert client.associate().types[-1:] == [ASSOCIATE_AC]
        started = time.monotonic()
        client.trickle(p_data(pdv(1, COMMAND | LAST, bytes(200))), interval=0.2, until=6.0)
        reply = client.read_until(3)
        seconds = time.monotonic() - started
    assert seconds < 1.0 + 2.0 and (reply.aborted or reply.ended == "closed"), (seconds, reply)
    node.wait_for_line("DIMSE/idle (network_timeout_s) deadline of 1.0 s expired")


def test_instance_deadline_relative_to_its_size(start_node, tmp_path: Path) -> None:
    """Each PDU within ``network_timeout_s``, but the instance slower than 1 MB/s after it: A-ABORT."""
    node = _limits_node(start_node, tmp_path, network_timeout_s=1.0)
    with RawClient(node.port) as client:
        assert client.associate().types[-1:] == [ASSOCIATE_AC]
        uid, data = ct_bytes()
        client.send(p_data(pdv(3, COMMAND | LAST, c_store_rq(uid))))
        started, aborted = time.monotonic(), False
        for offset in range(0, 40 * 1000, 1000):  # 1 kB every 0.4 s: each PDU in time, 2.5 kB/s in all
            if not client.send(p_data(pdv(3, 0, data[offset:offset + 1000]))):
                break
            reply = client.read_until(0.4, stop_after=(ABORT,))
            if reply.aborted or reply.ended == "closed":
                aborted = True
                break
        seconds = time.monotonic() - started
    assert aborted and seconds < 1.0 + 0.07 + 1.5, seconds
    node.wait_for_line("aborted", "instance deadline")
    log = node.wait_for_line("association from FUZZER", "aborted after")  # logged once its files are gone
    assert "Traceback" not in log and not list(node.data_dir.rglob("*.part"))


def test_calling_ae_bound_to_addresses(start_node, tmp_path: Path) -> None:
    node = _limits_node(start_node, tmp_path,
                        calling_ae_addresses='{ MODALITY = ["10.9.9.9"], LOCAL = ["127.0.0.0/8", "::1"] }')
    with RawClient(node.port) as client:
        assert client.associate(calling="MODALITY").rejected == (1, 1, 3)
    node.wait_for_line("rejected", "MODALITY", "from address 127.0.0.1")
    with RawClient(node.port) as client:
        assert client.associate(calling="LOCAL").types[-1:] == [ASSOCIATE_AC]
    with RawClient(node.port) as client:  # AE titles not listed call from anywhere
        assert client.associate(calling="OTHER").types[-1:] == [ASSOCIATE_AC]
