"""The PACS goes away while results wait, and the node dies with a full outbox.

Black-box: the node runs as ``python -m node serve`` with Orthanc as its only
destination; Orthanc is stopped and started again by its PID on the same
ports and storage; the node is killed with SIGKILL by its PID. What the node
did is read from ``series list``, its state database opened read-only
(``state.sqlite3``, table ``outbox``) and, where the node has it,
``outbox list``; what arrived, from Orthanc's QIDO-RS.

Every series is a fresh study (new Study, Series and SOP Instance UIDs on the
real abdomen slices), so that "one SEG and one SR per source series" can be
read off the study in Orthanc.

The scenario (``support/outage.py``) is shared with ``tests/soak_outage.py`` (longer outage, more
series). In CI the outage lasts ``PACS_AI_OUTAGE_SECONDS`` (default 12 s) and
the node's retry backoff is shortened to 0.5 s doubling to 2 s, so delivery
should follow Orthanc's return within a few seconds.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from support.node import StartNode
from support.orthanc import Orthanc
from support.outage import deliver_after_pacs_returns, outage_scenario, outbox, process_while_pacs_down, series_states

# -- the tests -----------------------------------------------------------------------------------


def test_results_queued_during_a_pacs_outage_all_arrive_once(orthanc: Orthanc, start_node: StartNode,
                                                             tmp_path: Path) -> None:
    node, report = outage_scenario(orthanc, start_node, tmp_path, series_count=3, slices=30)
    assert report.problems == [], report.problems
    assert report.duplicates == 0
    assert report.queued == 6
    # With retries every 2 s at most, delivery follows Orthanc's return within seconds.
    assert report.deliver_after_back_s < 20, report.summary()


def test_node_killed_with_a_full_outbox_delivers_after_restart(orthanc: Orthanc, start_node: StartNode,
                                                               tmp_path: Path) -> None:
    node, report, down_at = process_while_pacs_down(orthanc, start_node, tmp_path, series_count=2, slices=30,
                                                    retry_initial_s=0.5, retry_max_s=2.0)
    report.failed_attempts = sum(i.attempts for i in outbox(node.data_dir))
    node.stop(signal.SIGKILL)
    # The database survives the kill: everything is still waiting.
    waiting = [i for i in outbox(node.data_dir) if i.state == "pending"]
    assert len(waiting) == report.queued == 4, waiting

    orthanc.start()
    back_at = time.monotonic()
    report.outage_s = back_at - down_at
    start_node("--config", str(tmp_path / "node.toml"), "--send-to",
               f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--quiet-seconds", "2",
               port=node.port, data_dir=node.data_dir)
    print(f"node restarted {time.monotonic() - back_at:.1f} s after Orthanc came back")
    deliver_after_pacs_returns(orthanc, node.data_dir, report, timeout_s=60, back_at=back_at)
    assert report.problems == [], report.problems
    assert report.duplicates == 0
    # The restart did not process the series again (same results, nothing new queued).
    assert len(outbox(node.data_dir)) == 4
    assert set(series_states(node.data_dir).values()) == {"done"}
