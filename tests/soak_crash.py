"""Soak: the crash scenario of tests/system/test_crash.py for as many rounds as asked.

    python tests/soak_crash.py --rounds 200 --seed 7 --slices 40

Starts its own Orthanc (the PACS) and node under a temporary folder, plays the
rounds (kill -9 at random moments while series stream in and while results are
sent), then prints a summary: rounds, acknowledged instances, lost, series by
final state, time. Exit status 0 when nothing was lost and nothing is stuck.
Not collected by pytest (its name does not start with ``test_``).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.crashkit import CrashRig, finish_soak, play, verify  # noqa: E402
from support.orthanc import Orthanc  # noqa: E402
from support.processes import free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="crash rounds (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--slices", type=int, default=40, help="slices per series, 10..112 (default 40)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (node data, logs)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    workdir = Path(tempfile.mkdtemp(prefix="soak-crash-"))
    print(f"seed {seed}, {args.rounds} rounds of {args.slices} slices, work folder {workdir}", flush=True)

    pacs = Orthanc(workdir / "orthanc", "SOAKPACS", free_port(), free_port(), free_port())
    pacs.workdir.mkdir()
    pacs.start()
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    rig = CrashRig(workdir, pacs.node_port,
                   ["--send-to", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", "--quiet-seconds", "1"],
                   slices=args.slices, seed=seed, log=log)
    started = time.monotonic()
    try:
        play(rig, args.rounds)
        played = time.monotonic() - started
        verdict = verify(rig, pacs, settle_timeout=max(120.0, 2.0 * args.rounds))
    finally:
        rig.stop()
        pacs.stop()
    for line in verdict.problems:
        print(f"PROBLEM {line}")
    phases: dict[str, int] = {}
    for rnd in rig.rounds:
        phases[rnd.phase] = phases.get(rnd.phase, 0) + 1
    print(f"summary: {verdict.summary()}")
    print(f"kills by phase: {phases}; {rig.restarts} restarts, node start "
          f"{min(rig.restart_seconds):.2f}-{max(rig.restart_seconds):.2f} s; {played:.1f} s of rounds "
          f"({played / len(rig.rounds):.2f} s each), {time.monotonic() - started:.1f} s in all; seed {seed}")
    ok = not verdict.lost and not verdict.problems
    return finish_soak(ok, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
