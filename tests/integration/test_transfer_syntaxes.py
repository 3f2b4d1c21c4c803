"""Receive what real scanners and PACS send: every transfer syntax the installed codecs allow.

Slices of the real abdomen series are re-encoded by the tools a modality or a
PACS would use (DCMTK's dcmconv, dcmcjpeg, dcmcjpls and dcmcrle; pydicom's
encoders where DCMTK 3.6.7 has none), sent by DCMTK's ``storescu`` proposing
that transfer syntax, and then checked black-box:

- the node answers success and keeps the instance byte for byte (the data set
  bytes after the file meta group equal those of the file storescu sent);
- the node processes the series (``series list`` shows ``done``);
- pydicom decodes the spooled file, and for lossless syntaxes the HU equal
  those of the uncompressed original exactly; lossy ones stay within the
  encoder's error.

One node serves the whole module; each transfer syntax gets its own series.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from support.crashkit import series_states
from support.data import DATA, abdomen_files
from support.dcmtk import PEER_ENV, dcmtk
from support.node import NodeProcess
from support.processes import free_port, wait_for

SINGLE = DATA / "single-slices"
#: A contiguous run of slices (3 mm apart): enough for the node's eligibility
#: rules (at least 10 slices, 50 mm of coverage, no gaps) while keeping every series fast.
SLICES = slice(40, 60)
#: Terminal series states in ``series list``.
TERMINAL = ("done", "rejected", "failed")
#: JPEG-LS near-lossless NEAR parameter: every decoded pixel within this of the original.
JLS_NEAR = 2


# -- the data sets on the wire ------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a PS3.10 file after its file meta group (PS3.10 7.1), as stored.

    Parsed element by element (group 0002 is always explicit VR little endian),
    so it does not rely on File Meta Information Group Length being right.
    """
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a PS3.10 file"
    pos = 132
    while int.from_bytes(data[pos : pos + 2], "little") == 0x0002:
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"):
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos:]


def hounsfield(ds: Dataset) -> np.ndarray:
    """HU of a single-frame CT image (PS3.3 C.11.1.1.2: Rescale Slope and Intercept)."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float64) * slope + intercept


def run_tool(*args: str) -> None:
    made = subprocess.run([dcmtk(args[0]), *args[1:]], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, f"{' '.join(args)}: {made.stdout}{made.stderr}"


def storescu_verbose(port: int, files: list[Path], extra: list[str]) -> subprocess.CompletedProcess:
    """DCMTK storescu in verbose mode, so that each store response is printed."""
    return subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", "MODALITY", "-aec", "AINODE", *extra, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120, env=PEER_ENV,
    )


def wait_terminal(data_dir: Path, series_uid: str, timeout: float = 90) -> tuple[str, str]:
    def state() -> tuple[str, str] | None:
        found = series_states(data_dir).get(series_uid)
        return (found[0], found[2]) if found and found[0] in TERMINAL else None

    return wait_for(state, timeout, interval=0.5, what=f"series {series_uid} to be done, rejected or failed")


def spooled(data_dir: Path, sop_instance_uid: str) -> Path:
    """The node's copy of one instance: spool/<study>/<series>/<sop>.dcm."""
    found = list((data_dir / "spool").rglob(f"{sop_instance_uid}.dcm"))
    assert len(found) == 1, f"instance {sop_instance_uid}: {len(found)} files in the spool"
    return found[0]


# -- how each transfer syntax is made and proposed ----------------------------------------------


Encoder = Callable[[Path, Path], None]


def dcmtk_encoder(tool: str, *options: str) -> Encoder:
    return lambda src, dst: run_tool(tool, *options, str(src), str(dst))


def pydicom_encoder(syntax: UID, **kwargs: object) -> Encoder:
    """pydicom's own encoders (pylibjpeg-openjpeg, pyjpegls), then DCMTK's dcmconv so that
    the file is written the way storescu re-encodes a data set (lengths, padding)."""

    def encode(src: Path, dst: Path) -> None:
        if not get_encoder(syntax).is_available:
            pytest.skip(f"pydicom has no {syntax.name} encoder installed ({get_encoder(syntax).missing_dependencies})")
        ds = pydicom.dcmread(src)
        ds.compress(syntax, **kwargs)
        raw = dst.with_suffix(".pydicom.dcm")
        ds.save_as(raw, enforce_file_format=True)
        run_tool("dcmconv", str(raw), str(dst))

    return encode


@dataclass(frozen=True)
class Variant:
    """One transfer syntax: how to make it, how storescu proposes it, how exact it is."""

    name: str
    syntax: UID
    encode: Encoder
    #: storescu options that propose the syntax, or a function making them in a folder.
    propose: list[str] | Callable[[Path], list[str]]
    #: None: lossless, decoded HU must be identical; else (max mean |dHU|, max |dHU| or None).
    lossy: tuple[float, float | None] | None = None
    marks: list = field(default_factory=list)


def _process14_profile(folder: Path) -> list[str]:
    """storescu has no flag for JPEG Process 14 with a selection value other than 1: an
    association profile proposing only that syntax (DCMTK's storescu.cfg format)."""
    cfg = folder / "process14.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[Process14]\nTransferSyntax1 = 1.2.840.10008.1.2.4.57\n"
        "[[PresentationContexts]]\n[CTProcess14]\nPresentationContext1 = CTImageStorage\\Process14\n"
        "[[Profiles]]\n[Process14]\nPresentationContexts = CTProcess14\n"
    )
    return ["-xf", str(cfg), "Process14"]


VARIANTS = [
    Variant("implicit-vr-le", ImplicitVRLittleEndian, dcmtk_encoder("dcmconv", "+ti"), ["-xi"]),
    Variant("explicit-vr-le", ExplicitVRLittleEndian, dcmtk_encoder("dcmconv", "+te"), ["-xe"]),
    # Retired since 2004 but still sent by old modalities; pydicom decodes it.
    Variant("explicit-vr-be", ExplicitVRBigEndian, dcmtk_encoder("dcmconv", "+tb"), ["-xb"]),
    Variant("deflated-le", DeflatedExplicitVRLittleEndian, dcmtk_encoder("dcmconv", "+td"), ["-xd"]),
    # Lossy JPEG cannot hold 16-bit CT: DCMTK scales each slice into 8 or 12 bits and
    # writes the Rescale Slope/Intercept that map it back to HU (+un: keep our UIDs).
    Variant("jpeg-baseline", JPEGBaseline8Bit, dcmtk_encoder("dcmcjpeg", "+eb", "+un"), ["-xy"], lossy=(60.0, None)),
    Variant("jpeg-extended", JPEGExtended12Bit, dcmtk_encoder("dcmcjpeg", "+ee", "+un"), ["-xx"], lossy=(10.0, None)),
    Variant("jpeg-lossless-sv1", JPEGLosslessSV1, dcmtk_encoder("dcmcjpeg", "+e1"), ["-xs"]),
    Variant("jpeg-lossless-p14", JPEGLossless, dcmtk_encoder("dcmcjpeg", "+el", "+sv", "6"), _process14_profile),
    Variant("jpeg-ls-lossless", JPEGLSLossless, dcmtk_encoder("dcmcjpls", "+el"), ["-xt"]),
    # dcmcjpls refuses near-lossless for signed pixels ("Unsupported pixel representation
    # for near-lossless JPEG-LS compression"); pydicom's pyjpegls (CharLS, as in DCMTK) can.
    Variant("jpeg-ls-near-lossless", JPEGLSNearLossless, pydicom_encoder(JPEGLSNearLossless, jls_error=JLS_NEAR),
            ["-xu"], lossy=(float(JLS_NEAR), float(JLS_NEAR))),
    Variant("rle", RLELossless, dcmtk_encoder("dcmcrle"), ["-xr"]),
    # DCMTK 3.6.7 has no JPEG 2000 encoder; pylibjpeg-openjpeg (OpenJPEG) has.
    Variant("jpeg2000-lossless", JPEG2000Lossless, pydicom_encoder(JPEG2000Lossless), ["-xv"]),
    # PSNR 80 dB over the 16-bit range: RMS error about 65535 / 10**4 = 6.6.
    Variant("jpeg2000-lossy", JPEG2000, pydicom_encoder(JPEG2000, j2k_psnr=[80]), ["-xw"], lossy=(10.0, None)),
    # The node accepts HTJ2K (pylibjpeg-openjpeg decodes it), but nothing here can make or send it.
    Variant("htj2k-lossless", HTJ2KLossless, pydicom_encoder(HTJ2KLossless), [], marks=[pytest.mark.skip(
        reason="no HTJ2K encoder installed: pydicom 3.0 has none, pylibjpeg-openjpeg (OpenJPEG 2.5) only decodes "
               "HTJ2K, and DCMTK 3.6.7 (dcmc*, storescu) does not know the HTJ2K transfer syntaxes")]),
]


# -- one node for the module --------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the module (conftest's start_node is per test); 1 s quiet period."""
    folder = tmp_path_factory.mktemp("ts-node")
    proc = NodeProcess(data_dir=folder / "data", port=free_port(), args=["--quiet-seconds", "1"],
                       log=folder / "node.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def originals() -> list[Path]:
    files = abdomen_files()[SLICES]
    assert len(files) == SLICES.stop - SLICES.start
    return files


def make_series(originals: list[Path], folder: Path, encode: Encoder) -> tuple[str, list[Path]]:
    """A new series (fresh Series and SOP Instance UIDs) of the original slices, encoded."""
    plain, sent = folder / "plain", folder / "sent"
    plain.mkdir(parents=True)
    sent.mkdir()
    series_uid = generate_uid()
    files = []
    for i, path in enumerate(originals):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(plain / f"{i:03d}.dcm", enforce_file_format=True)
        encode(plain / f"{i:03d}.dcm", sent / f"{i:03d}.dcm")
        files.append(sent / f"{i:03d}.dcm")
    return series_uid, files


def assert_stored_byte_for_byte(node: NodeProcess, files: list[Path], syntax: UID) -> list[Path]:
    stored = []
    for path in files:
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        made = sent.file_meta.TransferSyntaxUID
        assert made == syntax, f"{path.name}: the encoder wrote {made.name}, not {syntax.name}"
        copy = spooled(node.data_dir, sent.SOPInstanceUID)
        meta = pydicom.dcmread(copy, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == syntax, f"stored as {meta.TransferSyntaxUID.name}, sent as {syntax.name}"
        assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        expected = dataset_bytes(path)
        if syntax == DeflatedExplicitVRLittleEndian and len(expected) % 2:
            # DCMTK 3.6.7's dcmconv writes an odd-length deflate stream as it is; on the
            # wire storescu pads it with one 0x00 byte to even length (pydicom's writer
            # pads files the same way). The node stores the padded bytes it received.
            expected += b"\x00"
        assert dataset_bytes(copy) == expected, f"{copy} differs from what was sent ({path})"
        stored.append(copy)
    return stored


@pytest.mark.parametrize("variant", [pytest.param(v, id=v.name, marks=v.marks) for v in VARIANTS])
def test_transfer_syntax_received_stored_and_processed(variant: Variant, node: NodeProcess, originals: list[Path],
                                                       tmp_path: Path) -> None:
    series_uid, files = make_series(originals, tmp_path, variant.encode)
    propose = variant.propose(tmp_path) if callable(variant.propose) else variant.propose

    sent = storescu_verbose(node.port, files, propose)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # storescu converts only between uncompressed syntaxes (never to or from a compressed one);
    # which syntax really went over the wire is checked on the stored file below.
    assert sent.stderr.count("Received Store Response (Success)") == len(files), sent.stderr

    stored = assert_stored_byte_for_byte(node, files, variant.syntax)

    # Decoded by pydicom's pixel-data plugins, as the pipeline decodes the spool.
    for copy, original in zip(stored, originals):
        got, want = hounsfield(pydicom.dcmread(copy)), hounsfield(pydicom.dcmread(original))
        assert got.shape == want.shape
        if variant.lossy is None:
            np.testing.assert_array_equal(got, want, err_msg=f"{variant.name}: lossless decode differs")
        else:
            mean_limit, max_limit = variant.lossy
            error = np.abs(got - want)
            assert error.mean() <= mean_limit, f"{variant.name}: mean |dHU| {error.mean():.2f} > {mean_limit}"
            if max_limit is not None:
                assert error.max() <= max_limit, f"{variant.name}: max |dHU| {error.max():.2f} > {max_limit}"

    state, reason = wait_terminal(node.data_dir, series_uid)
    assert state == "done", f"{variant.name}: series {state}: {reason}\n{node.output()[-3000:]}"


def test_real_jpeg2000_slice(node: NodeProcess, tmp_path: Path) -> None:
    """A JPEG 2000 lossless CT slice made by GDCM (from pydicom-data), codestream untouched.

    The original stores its attributes with VR UN, which DCMTK cannot take a SOP
    Class from; pydicom rewrites the header with the dictionary's VRs and keeps
    the encapsulated Pixel Data as it is. One slice: the node must store it and
    reject the series with a reason (too few slices), not lose it.
    """
    original = pydicom.dcmread(SINGLE / "explicit_VR-UN.dcm")
    assert original.file_meta.TransferSyntaxUID == JPEG2000Lossless
    ds = pydicom.dcmread(SINGLE / "explicit_VR-UN.dcm")
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    raw = tmp_path / "j2k.pydicom.dcm"
    ds.save_as(raw, enforce_file_format=True)
    path = tmp_path / "j2k.dcm"
    run_tool("dcmconv", str(raw), str(path))  # as storescu will encode it (Pixel Data OB, not OW)
    assert pydicom.dcmread(path).PixelData == original.PixelData

    sent = storescu_verbose(node.port, [path], ["-xv"])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "Received Store Response (Success)" in sent.stderr, sent.stderr
    copy, = assert_stored_byte_for_byte(node, [path], JPEG2000Lossless)
    np.testing.assert_array_equal(pydicom.dcmread(copy).pixel_array, original.pixel_array)
    assert pydicom.dcmread(copy).pixel_array.min() <= -1000  # air around the patient: real HU decoded

    state, reason = wait_terminal(node.data_dir, str(ds.SeriesInstanceUID))
    assert state == "rejected" and reason, f"series {state}: {reason!r}"
    assert "decod" not in reason.lower(), reason


def test_enhanced_ct_is_stored_and_accounted_for(node: NodeProcess, tmp_path: Path) -> None:
    """Enhanced CT (multi-frame, functional groups) from pydicom-data: stored as sent,
    and ``series list`` shows what became of it (processed, or rejected with a reason)."""
    ds = pydicom.dcmread(SINGLE / "eCT_Supplemental.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and int(ds.NumberOfFrames) == 2
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    raw = tmp_path / "enhanced.pydicom.dcm"
    ds.save_as(raw, enforce_file_format=True)
    path = tmp_path / "enhanced.dcm"
    run_tool("dcmconv", str(raw), str(path))

    sent = storescu_verbose(node.port, [path], [])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "Received Store Response (Success)" in sent.stderr, sent.stderr
    copy, = assert_stored_byte_for_byte(node, [path], ExplicitVRLittleEndian)
    assert pydicom.dcmread(copy).pixel_array.shape == (2, 512, 512)

    state, reason = wait_terminal(node.data_dir, str(ds.SeriesInstanceUID))
    assert state in ("done", "rejected") and reason, f"Enhanced CT series {state}: {reason!r}"
    print(f"Enhanced CT: {state}: {reason}")


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K], ids=lambda uid: uid.keyword)
def test_htj2k_contexts_accepted_where_decodable(syntax: UID, node: NodeProcess) -> None:
    """No HTJ2K encoder is installed (see the skipped variant), so only the negotiation is
    checked: the node accepts CT in HTJ2K exactly when pydicom can decode it."""
    from pydicom.pixels import get_decoder
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    decodable = get_decoder(syntax).is_available
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [syntax])
    ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    try:
        accepted = assoc.is_established and any(
            cx.transfer_syntax[0] == syntax for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    assert accepted == decodable, f"{syntax.name}: accepted {accepted}, pydicom can decode it: {decodable}"
