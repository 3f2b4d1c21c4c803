"""Soak: the DICOM listener under issue 16's hostile network, printing the issue's targets.

    python tests/soak_listener.py --seed 7                       # the issue's numbers
    python tests/soak_listener.py --malformed 100 --good-instances 20 --connections 20

Starts its own node (loopback only) and plays three phases:

1. flood: ``--connections`` idle connections from ``--flood-addresses`` loopback
   addresses (127.0.1.x, so that a per-address cap does not also refuse the probe
   from 127.0.0.1), each sending a 6-byte A-ASSOCIATE-RQ header claiming 64 MiB
   (``--flood-claim``: a length under the node's limit holds the connections until ARTIM):
   node RSS growth and a C-ECHO round trip during the flood (target <= 200 MB, <= 2 s);
2. slowloris: an A-ASSOCIATE-RQ trickled one byte every ``--slowloris-interval`` s:
   seconds until the node closed it (target <= ARTIM, 30 s by default), played
   beside phase 3;
3. ``--malformed`` inputs from the Hypothesis strategies of
   ``support/pdu_strategies.py`` (PDUs before and inside an association, damaged
   datasets), seeded, while ``--good-associations`` pynetdicom associations each
   send ``--good-instances`` small CT instances: crashes, leaked ``.part`` files,
   threads after vs before, good instances missing from the state store
   (target 0 / 0 / 0 / 0), and the count of each reason the node gave.

Exit status 0 when every target is met. Not collected by pytest (its name does
not start with ``test_``). Stops the node it started, by its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE  # noqa: E402

from support.listener_probe import (  # noqa: E402
    ct_bytes,
    ct_dataset,
    echo_seconds,
    part_files,
    rss_mb,
    start_listener_node,
    stored_uids,
    thread_count,
)
from support.node import NodeProcess  # noqa: E402
from support.pdu import (  # noqa: E402
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RQ,
    CT_IMAGE_STORAGE,
    P_DATA_TF,
    RawClient,
    associate_rq,
    c_store_rq,
    outcome,
    release_rq,
    store_messages,
)
from support.pdu_strategies import DATASET_EDITS, IN_ASSOCIATION, RAW_PDUS, RQ_PDUS, edited  # noqa: E402
from support.processes import wait_for  # noqa: E402


def _still_open(sock: socket.socket) -> bool:
    """Whether the node has neither closed this connection nor sent anything on it."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def flood(node: NodeProcess, connections: int, addresses: int, hold: float, claim: int
          ) -> tuple[float, float | None, int, int]:
    """(RSS growth in MB, C-ECHO seconds during the flood or None, connections made, still open after ``hold``)."""
    pid = node.proc.pid  # type: ignore[union-attr]  # started
    before = rss_mb(pid)
    socks: list[socket.socket] = []
    try:
        for i in range(connections):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.bind((f"127.0.1.{1 + i % max(addresses, 1)}", 0))
                sock.connect(("127.0.0.1", node.port))
                sock.sendall(struct.pack(">BBI", ASSOCIATE_RQ, 0, claim))
                socks.append(sock)
            except OSError:
                sock.close()
        peak = rss_mb(pid)
        echo = echo_seconds(node.port, timeout=10)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.1)
        return peak - before, echo, len(socks), sum(_still_open(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()


def slowloris(port: int, interval: float, limit: float, result: dict[str, float]) -> None:
    """Trickle an A-ASSOCIATE-RQ; ``result["closed_after_s"]`` (or ``"still_open_s"`` when the limit came)."""
    data = associate_rq()
    started = time.monotonic()
    with RawClient(port) as client:
        sent = client.trickle(data, interval, until=limit)
        if sent == len(data):
            client.read_until(1.0)
        key = "closed_after_s" if sent < len(data) else "still_open_s"
        result[key] = time.monotonic() - started
        result["bytes_sent"] = sent


def good_sender(port: int, count: int, index: int, sent: list[str], failures: list[str]) -> None:
    """One well-behaved association storing ``count`` small CT instances; UIDs acknowledged go to ``sent``."""
    ae = AE(ae_title=f"GOOD{index}")
    ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", bind_address=("127.0.0.1", 0))
    if not assoc.is_established:
        failures.append(f"good association {index} not established")
        return
    try:
        for i in range(count):
            ds = ct_dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            started = time.monotonic()
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError as exc:  # the association was aborted
                failures.append(f"good association {index}, instance {i}: {exc}")
                return
            if status and status.Status == 0:
                sent.append(str(ds.SOPInstanceUID))
            else:
                failures.append(f"good association {index}, instance {i}: status "
                                f"{status.get('Status') if status else None} after {time.monotonic() - started:.1f} s "
                                f"({time.strftime('%H:%M:%S')})")
                if assoc.is_aborted:
                    return
    finally:
        if assoc.is_established:
            assoc.release()


class MalformedRun:
    """Plays Hypothesis-drawn malformed input against the node; counts reasons and distinct inputs."""

    def __init__(self, node: NodeProcess, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self.reasons: Counter[str] = Counter()
        self.distinct: set[bytes] = set()
        self.problems: list[str] = []
        #: Transient A-ASSOCIATE-RJs (result 2) retried by :meth:`connect`.
        self.busy = 0

    def connect(self, associate: bool) -> RawClient | None:
        """A connection (with an accepted association when asked); a transient A-ASSOCIATE-RJ (result 2,
        e.g. the association limit while the previous association's slot is still being freed) is retried
        a few times, as a modality would, and counted."""
        for _ in range(20):
            client = RawClient(self.node.port)
            if not associate:
                return client
            answer = client.associate()
            if answer.types[-1:] == [ASSOCIATE_AC]:
                return client
            client.close()
            if answer.rejected is None or answer.rejected[0] != 2:
                break
            self.busy += 1
            time.sleep(0.05)
        self.problems.append(f"a valid association was refused: {outcome(answer)}")
        return None

    def exchange(self, messages: list[bytes], associate: bool) -> None:
        self.distinct.add(hashlib.sha1(bytes([associate]) + b"\0".join(messages)).digest())
        try:
            connected = self.connect(associate)
            if connected is None:
                return
            with connected as client:
                for message in messages:
                    if not client.send(message):
                        break
                client.finish_sending()
                reply = client.read_until(self.timeout)
        except OSError as exc:
            self.problems.append(f"connection failed: {exc}")
            return
        if reply.ended not in ("closed",):
            self.problems.append(f"connection still open after end of stream ({reply.ended})")
        self.reasons[outcome(reply)] += 1

    def dataset(self, edits: list[tuple[str, int, bytes]]) -> None:
        uid, clean = ct_bytes()
        data = edited(clean, edits)
        self.distinct.add(hashlib.sha1(repr(edits).encode()).digest())
        try:
            connected = self.connect(associate=True)
            if connected is None:
                return
            with connected as client:
                for message in store_messages(3, c_store_rq(uid), data):
                    if not client.send(message):
                        break
                reply = client.read_until(self.timeout, stop_after=(P_DATA_TF, ABORT))
                client.send(release_rq())
        except OSError as exc:
            self.problems.append(f"connection failed: {exc}")
            return
        self.reasons[f"dataset {outcome(reply)}"] += 1

    def play(self, count: int, rng_seed: int) -> None:
        config = settings(max_examples=max(-(-count // 3), 1), deadline=None, database=None, derandomize=False,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck))

        @config
        @seed(rng_seed)
        @given(st.lists(st.one_of(RQ_PDUS, RAW_PDUS), min_size=1, max_size=3))
        def before_association(messages: list[bytes]) -> None:
            self.exchange(messages, associate=False)

        @config
        @seed(rng_seed + 1)
        @given(IN_ASSOCIATION)
        def in_association(messages: list[bytes]) -> None:
            self.exchange(messages, associate=True)

        @config
        @seed(rng_seed + 2)
        @given(DATASET_EDITS)
        def datasets(edits: list[tuple[str, int, bytes]]) -> None:
            self.dataset(edits)

        for run in (before_association, in_association, datasets):
            run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100, help="flood connections (default 100)")
    parser.add_argument("--flood-addresses", type=int, default=1, help="loopback addresses they come from (1)")
    parser.add_argument("--flood-claim", type=int, default=64 * 1024 * 1024,
                        help="A-ASSOCIATE-RQ length each flood header claims (default 64 MiB)")
    parser.add_argument("--flood-hold", type=float, default=3.0, help="seconds the flood is held (default 3)")
    parser.add_argument("--slowloris-interval", type=float, default=2.0, help="seconds between bytes (default 2)")
    parser.add_argument("--malformed", type=int, default=1200, help="malformed inputs (default 1200)")
    parser.add_argument("--good-associations", type=int, default=8, help="good associations (default 8)")
    parser.add_argument("--good-instances", type=int, default=300, help="instances each sends (default 300)")
    parser.add_argument("--artim", type=float, default=None, help="artim_timeout_s for the node (default: its own)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (node data, log)")
    parser.add_argument("--max-seconds", type=float, default=900, help="give up on a phase after this (900)")
    args = parser.parse_args()
    rng_seed = args.seed if args.seed is not None else random.randrange(2**31)
    workdir = Path(tempfile.mkdtemp(prefix="soak-listener-"))
    extra = {"artim_timeout_s": str(args.artim)} if args.artim else {}
    node, keys = start_listener_node(workdir, base={}, extra=extra)
    keys.setdefault("artim_timeout_s", "(node default)")
    print(f"seed {rng_seed}, work folder {workdir}, node pid {node.proc.pid}, keys {keys}",  # type: ignore[union-attr]
          flush=True)
    ok = True
    try:
        pid = node.proc.pid  # type: ignore[union-attr]  # started
        echo_seconds(node.port)
        threads_before = thread_count(pid)

        growth, echo, held, open_after = flood(node, args.connections, args.flood_addresses, args.flood_hold,
                                                 args.flood_claim)
        echo_text = "failed" if echo is None else f"{echo:.2f} s"
        flood_ok = growth <= 200 and echo is not None and echo <= 2
        ok &= flood_ok
        print(f"flood: {args.connections} connections claiming {args.flood_claim} bytes ({held} connected from "
              f"{args.flood_addresses} address(es), {open_after} still open after {args.flood_hold:g} s): "
              f"RSS +{growth:.0f} MB (target <= 200), C-ECHO during it {echo_text} (target <= 2 s) "
              f"-> {'OK' if flood_ok else 'MISSED'}", flush=True)

        slow: dict[str, float] = {}
        artim = float(args.artim or 30.0)
        loris = threading.Thread(target=slowloris, args=(node.port, args.slowloris_interval,
                                                         min(artim + 30, args.max_seconds), slow), daemon=True)
        loris.start()
        sent: list[str] = []
        failures: list[str] = []
        senders = [threading.Thread(target=good_sender, args=(node.port, args.good_instances, i, sent, failures),
                                    daemon=True) for i in range(args.good_associations)]
        started = time.monotonic()
        for sender in senders:
            sender.start()
        malformed = MalformedRun(node, timeout=artim + 5)
        malformed.play(args.malformed, rng_seed)
        played = time.monotonic() - started
        for sender in senders:
            sender.join(timeout=max(1.0, args.max_seconds - (time.monotonic() - started)))
        loris.join(timeout=artim + 40)

        closed = slow.get("closed_after_s")
        loris_ok = closed is not None and closed <= artim + args.slowloris_interval + 1
        ok &= loris_ok
        print(f"slowloris: one byte every {args.slowloris_interval:g} s: "
              + (f"closed after {closed:.1f} s" if closed is not None else
                 f"still open after {slow.get('still_open_s', float('nan')):.1f} s")
              + f" ({slow.get('bytes_sent', 0):.0f} of {len(associate_rq())} bytes; target <= ARTIM "
              f"{artim:.0f} s) -> {'OK' if loris_ok else 'MISSED'}", flush=True)

        crashed = node.proc.poll() is not None  # type: ignore[union-attr]
        try:
            wait_for(lambda: not part_files(node.data_dir), 30, what="no .part files")
        except TimeoutError:
            pass
        leaked = len(part_files(node.data_dir))
        threads_after = threads_before
        if not crashed:
            try:
                wait_for(lambda: thread_count(pid) <= threads_before + 2, 30, what="threads back")
            except TimeoutError:
                pass
            threads_after = thread_count(pid)
        lost = set(sent) - stored_uids(node.data_dir)
        expected = args.good_associations * args.good_instances
        tracebacks = node.output().count("Traceback")
        targets_ok = (not crashed and not leaked and threads_after <= threads_before + 2 and not lost
                      and len(sent) == expected and not failures and not malformed.problems and not tracebacks)
        ok &= targets_ok
        print(f"malformed: {sum(malformed.reasons.values())} inputs ({len(malformed.distinct)} distinct) in "
              f"{played:.1f} s beside {args.good_associations} good associations x {args.good_instances} instances",
              flush=True)
        for reason, n in malformed.reasons.most_common():
            print(f"  {n:5d}  {reason}")
        print(f"transient rejections of a valid association (retried): {malformed.busy}")
        print(f"crashes {int(crashed)}, leaked .part files {leaked}, threads {threads_before} before / "
              f"{threads_after} after, good instances acknowledged {len(sent)}/{expected}, lost {len(lost)}, "
              f"tracebacks in the log {tracebacks} -> {'OK' if targets_ok else 'MISSED'}")
        for line in (failures + malformed.problems)[:20]:
            print(f"PROBLEM {line}")
    finally:
        node.stop()
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work folder kept: {workdir} (node log {node.log.name})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
