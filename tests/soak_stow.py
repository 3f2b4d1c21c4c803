"""Soak: malformed STOW-RS requests beside good ones, printing issue 16's targets for the HTTP side.

    python tests/soak_stow.py --seed 7                          # 1,000 distinct malformed requests
    python tests/soak_stow.py --distinct 200 --good-instances 20

Starts the node's HTTP app (uvicorn in a thread, the real Intake, spool and
state in a temporary folder, loopback only) and sends malformed requests from
the Hypothesis strategies of ``support/stow_fuzz.py`` (seeded; batches until
``--distinct`` different ones were sent) while
``--good-senders`` threads each STOW ``--good-instances`` distinct small CT
instances. Prints: distinct malformed inputs, wrong answers (500, no reason;
target 0), leaked temporary files (0), good instances missing from the spool
(0), threads before and after, peak RSS, and the count of each answer.

Exit status 0 when every target is met. Not collected by pytest (its name does
not start with ``test_``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pydicom  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from support.stow_fuzz import (  # noqa: E402
    CT_SMALL,
    StowFuzzNode,
    answer_problem,
    good_body,
    multipart_requests,
    reason_of,
)


def good_instances(count: int, tag: str) -> list[tuple[str, str, str, bytes]]:
    """``count`` copies of CT_small with their own UIDs: (study, series, instance, PS3.10 bytes)."""
    template = pydicom.dcmread(BytesIO(CT_SMALL))
    study, series = generate_uid(), generate_uid()
    out = []
    for _ in range(count):
        template.StudyInstanceUID, template.SeriesInstanceUID = study, series
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = BytesIO()
        template.save_as(buffer, enforce_file_format=True)
        out.append((study, series, template.SOPInstanceUID, buffer.getvalue()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distinct", type=int, default=1000, help="distinct malformed requests (default 1000)")
    parser.add_argument("--good-senders", type=int, default=4, help="threads sending good instances (default 4)")
    parser.add_argument("--good-instances", type=int, default=100, help="good instances per sender (default 100)")
    parser.add_argument("--seed", type=int, default=7, help="Hypothesis seed (default 7)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # one warning per refusal is the node's normal log; errors show

    with tempfile.TemporaryDirectory(prefix="soak-stow-") as root:
        node = StowFuzzNode(Path(root))
        threads_before = threading.active_count()
        good = [good_instances(args.good_instances, f"sender-{i}") for i in range(args.good_senders)]
        good_failures: list[str] = []

        def send_good(instances: list[tuple[str, str, str, bytes]]) -> None:
            for *_, data in instances:
                status, _, raw = node.post("/studies", good_body(data))
                if status != 200:
                    good_failures.append(f"HTTP {status}: {raw[:200]!r}")

        senders = [threading.Thread(target=send_good, args=(g,), daemon=True) for g in good]
        problems: list[str] = []
        reasons: Counter[str] = Counter()
        distinct: set[bytes] = set()

        @settings(max_examples=args.distinct, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(request=multipart_requests())
        def malformed(request: tuple[str, bytes]) -> None:
            content_type, body = request
            distinct.add(hashlib.sha256(content_type.encode() + b"\0" + body).digest())
            status, headers, raw = node.post("/dicom-web/studies", body, content_type)
            problem = answer_problem(status, headers, raw)
            if problem:
                problems.append(problem)
            else:
                reasons[reason_of(status, raw)] += 1

        started = time.monotonic()
        for sender in senders:
            sender.start()
        for batch in range(100):  # bounded: each batch adds hundreds of new inputs
            if len(distinct) >= args.distinct:
                break
            seed(args.seed + batch)(malformed)()
        for sender in senders:
            sender.join(300)
        elapsed = time.monotonic() - started
        status, _, _ = node.post("/studies", good_body(CT_SMALL))
        missing = [uid for g in good for study, series, uid, _ in g
                   if not node.spool.instance_path(study, series, uid).exists()]
        leaked = node.temp_files()
        threads_after = threading.active_count()
        node.stop()

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{sum(reasons.values()) + len(problems)} malformed requests ({len(distinct)} distinct) beside "
          f"{args.good_senders} x {args.good_instances} good instances in {elapsed:.1f} s")
    print(f"wrong answers (500, no reason): {len(problems)} (target 0){': ' + problems[0] if problems else ''}")
    print(f"leaked temporary files: {len(leaked)} (target 0)")
    print(f"good instances missing: {len(missing)} (target 0); good requests failed: {len(good_failures)}")
    print(f"node answers afterwards: HTTP {status} (target 200)")
    print(f"threads before {threads_before}, after {threads_after} (uvicorn's worker pool); peak RSS {peak_mb:.0f} MB")
    print("answers:")
    for reason, count in reasons.most_common():
        print(f"  {count:5d}  {reason}")
    ok = (len(distinct) >= args.distinct and not problems and not leaked and not missing and not good_failures
          and status == 200)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
