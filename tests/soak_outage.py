"""Soak: the PACS outage of tests/system/test_outage.py, longer and with more series.

    python tests/soak_outage.py --outage-seconds 600 --series 10

Starts its own Orthanc (the PACS) and node under a temporary folder; starts
the node, stops Orthanc by its PID, sends the series to the node (fresh UIDs
each), waits until they are processed and every result has failed to send,
keeps Orthanc down for ``--outage-seconds`` (counted from when it stopped),
starts it again on the same ports and storage, and waits until every result
is there. Prints: outage length, results queued, failed send attempts, time
from Orthanc's return to the last result delivered, duplicates (extra SEG or
SR for a source series), problems. The node's own retry backoff is used unless
``--retry-initial``/``--retry-max`` say otherwise (defaults 5 s doubling to
300 s: after a long outage the last results may wait up to that long).
Exit status 0 when everything arrived once. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.crashkit import finish_soak  # noqa: E402
from support.node import NodeProcess  # noqa: E402
from support.orthanc import Orthanc  # noqa: E402
from support.outage import outage_scenario  # noqa: E402
from support.processes import free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-seconds", type=float, default=300.0, help="how long Orthanc stays down (default 300)")
    parser.add_argument("--series", type=int, default=5, help="series sent during the outage (default 5)")
    parser.add_argument("--slices", type=int, default=30, help="slices per series, 10..112 (default 30)")
    parser.add_argument("--retry-initial", type=float, default=5.0,
                        help="node's send_retry_initial_s (default 5, the node's default)")
    parser.add_argument("--retry-max", type=float, default=300.0,
                        help="node's send_retry_max_s (default 300, the node's default)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (node data, logs)")
    args = parser.parse_args()
    if not 10 <= args.slices <= 112:
        parser.error("--slices must be in 10..112")
    workdir = Path(tempfile.mkdtemp(prefix="soak-outage-"))
    print(f"{args.series} series of {args.slices} slices, outage {args.outage_seconds:.0f} s, node retry "
          f"{args.retry_initial:g} s doubling to {args.retry_max:g} s; work folder {workdir}", flush=True)

    pacs = Orthanc(workdir / "orthanc", "SOAKPACS", free_port(), free_port(), free_port())
    pacs.workdir.mkdir()
    pacs.start()
    nodes: list[NodeProcess] = []

    def start_node(*node_args: str, port: int | None = None, data_dir: Path | None = None) -> NodeProcess:
        node = NodeProcess(data_dir=data_dir or workdir / "node-data", port=port or free_port(),
                           args=list(node_args), log=workdir / f"node-{len(nodes)}.log")
        node.start()
        nodes.append(node)
        return node

    started = time.monotonic()
    report = None
    try:
        _, report = outage_scenario(
            pacs, start_node, workdir, series_count=args.series, slices=args.slices,
            outage_s=args.outage_seconds, retry_initial_s=args.retry_initial, retry_max_s=args.retry_max,
            log=lambda line: print(f"[{time.monotonic() - started:7.1f} s] {line}", flush=True),
        )
    finally:
        for node in nodes:
            node.stop()
        pacs.stop()
    for line in report.problems:
        print(f"PROBLEM {line}")
    print(f"outage: {report.outage_s:.1f} s")
    print(f"results queued: {report.queued} ({report.failed_attempts} failed send attempts during the outage)")
    print(f"Orthanc back -> first result delivered: {report.first_after_back_s:.1f} s, "
          f"all delivered: {report.deliver_after_back_s:.1f} s")
    print(f"duplicates: {report.duplicates}")
    print(f"total: {time.monotonic() - started:.1f} s")
    ok = not report.problems and report.duplicates == 0
    return finish_soak(ok, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
