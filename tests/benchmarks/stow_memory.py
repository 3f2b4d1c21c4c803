"""Peak memory of the STOW-RS server while it receives one large instance (issue 16 item 6).

A child process runs the node's HTTP app (the real Intake, spool and state in
a temporary folder); this script streams one multipart/related request with a
single CT instance of about ``--mb`` MB (pixel data generated on the fly, so
the client holds only a chunk) and prints the child's RSS before and its peak
(VmHWM) after. Run from the repository root:

    .venv/bin/python tests/benchmarks/stow_memory.py --mb 300

To measure another checkout of the code (e.g. ``git archive`` of an older
commit unpacked in /tmp/old), put it first on the path:
``PYTHONPATH=/tmp/old .venv/bin/python tests/benchmarks/stow_memory.py``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

BOUNDARY = "stow-memory-benchmark"
CHUNK = 1 << 20


def serve(root: Path) -> None:
    """The child: the node's HTTP app on a free loopback port, printed on stdout; runs until killed."""
    from node.config import NodeConfig
    from node.http.server import HttpServer, create_app
    from node.receive.intake import Intake
    from node.store.spool import Spool
    from node.store.state import StateStore

    config = NodeConfig(data_dir=root, min_free_disk_mb=1)
    intake = Intake(config, Spool(config.spool_dir), StateStore(config.state_path))
    server = HttpServer(create_app(intake), "127.0.0.1", 0)
    server.start()
    print(server.port, flush=True)
    while True:
        time.sleep(3600)


def header_bytes(side: int) -> bytes:
    """A PS3.10 CT Image with ``side`` x ``side`` 16-bit pixels, up to the Pixel Data value."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelData = b"\0\0"  # replaced by the streamed value below
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    data = out.getvalue()
    return data[:-6] + (side * side * 2).to_bytes(4, "little")  # the Pixel Data length, then the value


def body(side: int) -> Iterator[bytes]:
    yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + header_bytes(side)
    left = side * side * 2
    chunk = bytes(range(256)) * (CHUNK // 256)
    while left:
        yield chunk[:min(left, CHUNK)]
        left -= min(left, CHUNK)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the instance in MB (default 300)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    side = int((args.mb * 1e6 / 2) ** 0.5)
    with tempfile.TemporaryDirectory(prefix="stow-memory-") as root:
        child = subprocess.Popen([sys.executable, __file__, "--serve", root], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            before = memory_mb(child.pid)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            started = time.monotonic()
            connection.request("POST", "/studies", body=body(side), encode_chunked=True, headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
            response = connection.getresponse()
            answer = response.read()
            elapsed = time.monotonic() - started
            after = memory_mb(child.pid)
            stored = json.loads(answer).get("00081199", {}).get("Value", [])
            size_mb = side * side * 2 / 1e6
            print(f"STOW-RS of one {size_mb:.0f} MB instance: HTTP {response.status}, {len(stored)} stored, "
                  f"{size_mb / elapsed:.0f} MB/s")
            print(f"server RSS before {before['VmRSS']:.0f} MB, peak {after['VmHWM']:.0f} MB "
                  f"(+{after['VmHWM'] - before['VmRSS']:.0f} MB for the request)")
        finally:
            child.kill()
            child.wait(10)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    socket.setdefaulttimeout(600)
    main()
