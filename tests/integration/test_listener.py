"""The listener's refusals, each with the right DICOM status, and a node that keeps serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from support.data import DATA, abdomen_files
from support.dcmtk import dcmtk, storescu

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
    from support.processes import wait_for

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
