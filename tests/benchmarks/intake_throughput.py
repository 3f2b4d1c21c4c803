"""Ingest throughput: DCMTK storescu -> DCMTK storescp vs -> the node, same run.

Sends the same 300 CT instances (512 x 512, int16) over one association to
each receiver, then 4 concurrent associations (4 series of 75), and prints
instances/s and the node/storescp ratio (median of ``--repeats`` runs). The
node writes durably (fsync before each success status); storescp does not.
storescp runs with ``--fork`` for the concurrent case (one process per
association), single-process otherwise.

    .venv/bin/python tests/benchmarks/intake_throughput.py [--count 300] [--pdu 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import DCMTK, PEER_ENV, free_port, make_series, median, start_node, stop, storescu, wait_port


def run_concurrent(port: int, batches: list[list[Path]], called: str) -> float:
    errors: list[BaseException] = []

    def send(files: list[Path]) -> None:
        try:
            storescu(port, files, called)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def durable_write_floor(folder: Path, size: int, count: int) -> float:
    """Seconds per instance for the node's durable-write sequence alone (no network, no parsing):
    write to a temp file, fdatasync, rename into another folder, fsync that folder."""
    incoming, final = folder / "incoming", folder / "final"
    shutil.rmtree(folder, ignore_errors=True)
    incoming.mkdir(parents=True)
    final.mkdir()
    data = os.urandom(size)
    dir_fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    os.sync()
    start = time.perf_counter()
    try:
        for i in range(count):
            tmp = incoming / f".{i}.part"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fdatasync(f.fileno())
            os.replace(tmp, final / f"{i}.dcm")
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    elapsed = (time.perf_counter() - start) / count
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--pdu", type=int, default=16384, help="maximum PDU both receivers announce")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pacs-ai-node-bench")
    args = parser.parse_args()

    # New instances in every run, as a PACS sends them (no receiver replaces files it already has).
    ones = [make_series(args.work / f"one-{r}", args.count, tag=f"bench-one-{r}") for r in range(args.repeats)]
    quarter = args.count // 4
    fours = [[make_series(args.work / f"four-{r}-{k}", quarter, tag=f"bench-four-{r}-{k}") for k in range(4)]
             for r in range(args.repeats)]
    mb = sum(p.stat().st_size for p in ones[0]) / 1e6
    print(f"{args.count} instances, {mb:.0f} MB; 4 x {quarter} for the concurrent case; max PDU {args.pdu}; "
          f"{args.repeats} runs each, new instances in every run")

    results: dict[str, list[float]] = {}
    out = args.work / "received"

    def measure(name: str, port: int, called: str, concurrent: bool) -> None:
        for r in range(args.repeats):
            # Start every run with no dirty pages: otherwise the write-back of what storescp
            # wrote (without fsync) lands on the node's fsyncs, or the other way round.
            os.sync()
            secs = run_concurrent(port, fours[r], called) if concurrent else storescu(port, ones[r], called)
            results.setdefault(name, []).append((quarter * 4 if concurrent else args.count) / secs)

    for concurrent in (False, True):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        port = free_port()
        cmd = [str(DCMTK / "storescp"), "-aet", "STORESCP", "--max-pdu", str(args.pdu), "-od", str(out)]
        if concurrent:
            cmd.append("--fork")
        scp = subprocess.Popen([*cmd, str(port)], env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            measure(f"storescp {'4 assoc' if concurrent else '1 assoc'}", port, "STORESCP", concurrent)
        finally:
            stop(scp)

    data_dir = args.work / "node-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = args.work / "bench.toml"
    # No processing during the benchmark: the series would compete for the CPU.
    config.write_text(
        f"[node]\nmax_pdu_size = {args.pdu}\n[series]\nseries_quiet_seconds = 86400\ncomplete_on_release = false\n"
    )
    port = free_port()
    node = start_node(data_dir, port, "--http-port", "0", config=config, log=args.work / "node.log")
    try:
        measure("node 1 assoc", port, "AINODE", False)
        measure("node 4 assoc", port, "AINODE", True)
    finally:
        stop(node)

    print(f"{'receiver':<22} {'instances/s (median)':>22}  runs")
    for name, values in results.items():
        print(f"{name:<22} {median(values):>22.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    for mode in ("1 assoc", "4 assoc"):
        ratio = median(results[f"node {mode}"]) / median(results[f"storescp {mode}"])
        print(f"ratio node/storescp, {mode}: {ratio:.2f}")
    scaling = median(results["node 4 assoc"]) / median(results["node 1 assoc"])
    print(f"node scaling 4 assoc / 1 assoc: {scaling:.2f}")
    floor = median([durable_write_floor(args.work / "floor", ones[0][0].stat().st_size, args.count)
                    for _ in range(args.repeats)])
    print(f"durable write alone (write, fdatasync, rename, fsync dir): {floor * 1000:.2f} ms per instance, "
          f"a ceiling of {1 / floor:.0f} instances/s on one association = "
          f"{(1 / floor) / median(results['storescp 1 assoc']):.2f}x storescp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
