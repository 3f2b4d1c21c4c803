"""``pacs-ai-node serve`` as a subprocess, the way an admin runs it, and waits on its log."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from support.data import REPO
from support.processes import free_port, port_open, stop_process, wait_for


@dataclass
class NodeProcess:
    """``pacs-ai-node serve`` as a subprocess, the way an admin runs it."""

    data_dir: Path
    port: int
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = field(default_factory=free_port)
    #: The DICOM TLS port, where a test configured one.
    tls_port: int | None = None

    def start(self) -> None:
        """Start the node and wait (bounded) until its DICOM listener accepts connections."""
        # Intake and delivery tests run the quick constructed bundle alone unless a test names others.
        models = [] if "--models" in self.args else ["--models", "body-lungs"]
        cmd = [sys.executable, "-m", "node", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--http-port", str(self.http_port), *models, *self.args]
        proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=REPO)
        self.proc = proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"node exited with {proc.returncode}: {self.log.read_text()[-3000:]}")
            return port_open(self.port)

        wait_for(ready, 60, what="node listener")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the node by its PID (SIGKILL after 30 s); returns its exit status."""
        return stop_process(self.proc, sig) if self.proc is not None else 0

    def output(self) -> str:
        """Everything the node logged so far."""
        return self.log.read_text()

    def wait_for_line(self, *texts: str, after: int = 0, timeout: float = 30) -> str:
        """Wait (bounded) until the log, from character ``after`` on, holds a line with each of ``texts``.

        Returns the log from ``after`` on. Wait for the very line a test asserts on: a line
        logged just before it does not mean it is written yet.
        """
        return wait_for_log_line(self.output, *texts, after=after, timeout=timeout)


#: ``start_node(*args, port=None, data_dir=None) -> NodeProcess``, as conftest's fixture.
StartNode = Callable[..., NodeProcess]


def wait_for_log_line(read: Callable[[], str], *texts: str, after: int = 0, timeout: float = 30) -> str:
    """Wait until one line of ``read()[after:]`` contains every one of ``texts``; return ``read()[after:]``."""

    def found() -> str:
        log = read()[after:]
        return log if any(all(t in line for t in texts) for line in log.splitlines()) else ""

    return wait_for(found, timeout, what=f"a log line with {' and '.join(map(repr, texts))}")


def transfers_audited(data_dir: Path) -> int:
    """How many "DICOM Instances Transferred" (DCM 110104) audit events the node has written.

    The node writes this event when it has finished with an association (after it decided
    whether the association's series are complete), so a test can wait for it instead of
    sleeping before it asserts that nothing happened on release.
    """
    from node.observe.audit import read_events

    return sum(1 for e in read_events(data_dir) if e["EventIdentification"]["EventID"]["code"] == "110104")
