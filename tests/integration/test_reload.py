"""SIGHUP reloads the configuration a running node can take, and says what needs a restart."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from support.data import REPO


def _echo(port: int, calling: str) -> int:
    return subprocess.run([sys.executable, "-m", "node", "echo", f"AINODE@127.0.0.1:{port}", "--calling-ae", calling],
                          capture_output=True, text=True, timeout=60, cwd=REPO).returncode


def test_sighup_applies_live_settings_and_names_those_needing_a_restart(start_node, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nallowed_calling_ae_titles = ["CT1"]\n')
    node = start_node("--config", str(config), "--quiet-seconds", "60")
    assert _echo(node.port, "CT1") == 0
    assert _echo(node.port, "CT2") == 1  # not on the allow-list

    config.write_text('[node]\nallowed_calling_ae_titles = ["CT2"]\nmax_pdu_size = 65536\n'
                      '[series]\nseries_quiet_seconds = 5.0\n')
    mark = len(node.output())
    node.proc.send_signal(signal.SIGHUP)
    # The restart warning is logged after "configuration reloaded": wait for each line asserted on.
    node.wait_for_line("configuration reloaded:", after=mark)
    log = node.wait_for_line("max_pdu_size changed but only take effect after a restart", after=mark)
    assert "allowed_calling_ae_titles" in log and "max_pdu_size changed but only take effect after a restart" in log
    # --quiet-seconds on the command line still wins over the file.
    assert "series_quiet_seconds" not in log.split("configuration reloaded:")[1].splitlines()[0]
    assert _echo(node.port, "CT2") == 0
    assert _echo(node.port, "CT1") == 1

    # A broken file changes nothing and the node keeps serving.
    config.write_text('[node]\nallowed_calling_ae_titles = "CT1"\n')
    mark = len(node.output())
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for_line("configuration reload refused", after=mark)
    assert _echo(node.port, "CT2") == 0
    assert node.proc.poll() is None
