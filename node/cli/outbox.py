"""``pacs-ai-node outbox``: see what waits to be delivered, and act on it.

    pacs-ai-node outbox list  [--state pending|sent|dead] [--destination NAME] [--limit N]
    pacs-ai-node outbox retry [--id N ...] [--destination NAME] [--all-dead]
    pacs-ai-node outbox purge [--sent-older-than DAYS] [--dead | --dead-older-than DAYS] [--destination NAME]

Each also takes ``--config FILE`` and ``--data-dir DIR`` and works on the
state database while the node runs (SQLite in WAL mode): items made due by
``retry`` go out at the node's next sender round (within a second).

``retry`` makes dead items, and pending items that have failed before, due
now with a fresh attempt count and age; sent items are never touched.
``purge`` deletes outbox rows only (sent ones sent more than DAYS ago, dead
ones), never pending ones, and never a file: result files stay under
``results/``, where the series' last result version is read back when a
late instance makes a new version.

Exit status: 0 done (``retry``: at least one item made due); 1 no state
database in the data dir, or nothing to retry; 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TextIO, TypeVar

from node.config import load_config
from node.store.state import DEAD, OUTBOX_STATES, PENDING, SENT, OutboxRow, StateStore, short_class_name

EXIT_DONE = 0
EXIT_NOTHING = 1
EXIT_USAGE = 2
DAY = 24 * 3600.0


_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def add_parser(subparsers: argparse._SubParsersAction[_Parser]) -> argparse.ArgumentParser:
    """Register ``outbox list|retry|purge`` on the node's top-level subparsers."""
    outbox = subparsers.add_parser("outbox", help="result objects waiting for, sent to or dead at each destination")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML config file (see deploy/node.example.toml)")
        p.add_argument("--data-dir", help="where the state database lives (default: the config's, else ./var)")
        p.add_argument("--destination", metavar="NAME", help="only items for this destination (its name)")

    listing = outbox_sub.add_parser("list", help="outbox items, newest first",
                                    description="Outbox items, newest first, then a count per destination and state.")
    common(listing)
    listing.add_argument("--state", choices=OUTBOX_STATES, help="only items in this state")
    listing.add_argument("--limit", type=int, default=100, help="at most this many items (default 100)")
    listing.set_defaults(func=cmd_outbox_list)

    retry = outbox_sub.add_parser(
        "retry", help="send dead (or failed pending) items again now",
        description="Make dead items, and pending items that failed before, due now with a fresh attempt count and "
        "age. Exit 0 when at least one item was made due, 1 when none matched.")
    common(retry)
    retry.add_argument("--id", type=int, action="append", dest="ids", metavar="N", help="this item (repeatable)")
    retry.add_argument("--all-dead", action="store_true", help="every dead item (with --destination: of that one)")
    retry.set_defaults(func=cmd_outbox_retry)

    purge = outbox_sub.add_parser(
        "purge", help="delete sent or dead items from the outbox (never files, never pending items)",
        description="Delete outbox rows: sent items sent more than DAYS ago, dead items. Result files are kept.")
    common(purge)
    purge.add_argument("--sent-older-than", type=float, metavar="DAYS", help="sent items sent more than DAYS ago")
    purge.add_argument("--dead", action="store_true", help="every dead item")
    purge.add_argument("--dead-older-than", type=float, metavar="DAYS", help="dead items dead for more than DAYS")
    purge.set_defaults(func=cmd_outbox_purge)
    return outbox


def _open_state(args: argparse.Namespace) -> StateStore | None:
    """The node's state store, or None (after saying so) when the data dir has none."""
    config = load_config(args.config)
    if args.data_dir:
        config = config.with_overrides(data_dir=Path(args.data_dir))
    if args.config and args.destination and args.destination not in {str(d) for d in config.destinations}:
        print(f"note: {args.destination!r} is not a destination in {args.config}", file=sys.stderr)
    if not config.state_path.exists():
        print(f"no state database at {config.state_path}", file=sys.stderr)
        return None
    return StateStore(config.state_path)


def _when(row: OutboxRow, now: float) -> str:
    def clock(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    if row.state == SENT and row.sent_at is not None:
        return f"sent {clock(row.sent_at)}"
    if row.state == DEAD:
        return f"dead {clock(row.dead_at)}" if row.dead_at is not None else "dead"
    if row.state == PENDING:
        return "due now" if row.next_attempt_at <= now else f"next {clock(row.next_attempt_at)}"
    return ""


def _outcome(row: OutboxRow) -> str:
    return "; ".join(part for part in (row.last_status, row.last_error) if part)


def cmd_outbox_list(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the items as a table, newest first, and the counts per destination and state."""
    out = out or sys.stdout
    state = _open_state(args)
    if state is None:
        return EXIT_NOTHING
    rows = state.list_outbox(limit=args.limit, state=args.state, destination=args.destination)
    now = time.time()
    width = max([len("destination")] + [len(r.destination) for r in rows])
    objects = [short_class_name(r.sop_class_uid) for r in rows]
    object_width = max([len("object")] + [len(o) for o in objects])
    print(f"{'id':>6}  {'destination':<{width}}  {'object':<{object_width}}  {'state':<7}  {'tries':>5}  "
          f"{'next attempt / sent / dead':<24}  last status / error", file=out)
    for row, obj in zip(rows, objects):
        print(f"{row.id:>6}  {row.destination:<{width}}  {obj:<{object_width}}  {row.state:<7}  {row.attempts:>5}  "
              f"{_when(row, now):<24}  {_outcome(row)}", file=out)
    counts = state.outbox_counts()
    totals: dict[str, list[str]] = {}
    for (destination, item_state), n in sorted(counts.items()):
        if args.destination is None or destination == args.destination:
            totals.setdefault(destination, []).append(f"{n} {item_state}")
    summary = "; ".join(f"{d}: {', '.join(parts)}" for d, parts in totals.items())
    print(f"{len(rows)} item(s) shown" + (f" ({summary})" if summary else ""), file=out)
    return EXIT_DONE


def cmd_outbox_retry(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Make the selected dead / failed items due now."""
    out = out or sys.stdout
    if not args.ids and not args.destination and not args.all_dead:
        print("error: give --id N, --destination NAME or --all-dead", file=sys.stderr)
        return EXIT_USAGE
    state = _open_state(args)
    if state is None:
        return EXIT_NOTHING
    retried = state.retry_outbox(ids=args.ids, destination=args.destination, all_dead=args.all_dead)
    for row in retried:
        print(f"item {row.id}: {short_class_name(row.sop_class_uid)} {row.sop_instance_uid} to {row.destination}: "
              f"{row.state} after {row.attempts} attempts ({_outcome(row) or 'no status'}) -> pending, due now",
              file=out)
    if args.ids:
        found = {row.id: row for row in state.outbox_items(args.ids)}
        for item_id in args.ids:
            if item_id not in found:
                print(f"item {item_id}: no such item", file=out)
            elif found[item_id].state == SENT:
                print(f"item {item_id}: already sent; nothing to retry", file=out)
            elif item_id not in {row.id for row in retried}:
                print(f"item {item_id}: {found[item_id].state} and not failed; nothing to retry", file=out)
    if not retried:
        print("nothing to retry", file=out)
        return EXIT_NOTHING
    print(f"{len(retried)} item(s) due now: a running node sends them within a second", file=out)
    return EXIT_DONE


def cmd_outbox_purge(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Delete sent items older than a number of days and/or dead items."""
    out = out or sys.stdout
    if args.sent_older_than is None and not args.dead and args.dead_older_than is None:
        print("error: give --sent-older-than DAYS, --dead or --dead-older-than DAYS", file=sys.stderr)
        return EXIT_USAGE
    for value in (args.sent_older_than, args.dead_older_than):
        if value is not None and value < 0:
            print(f"error: {value} days: must be >= 0", file=sys.stderr)
            return EXIT_USAGE
    state = _open_state(args)
    if state is None:
        return EXIT_NOTHING
    now = time.time()
    if args.dead:
        dead_before: float | None = math.inf
    else:
        dead_before = None if args.dead_older_than is None else now - args.dead_older_than * DAY
    removed = state.purge_outbox(
        sent_before=None if args.sent_older_than is None else now - args.sent_older_than * DAY,
        dead_before=dead_before,
        destination=args.destination,
    )
    print(f"{removed} item(s) removed from the outbox (result files kept)", file=out)
    return EXIT_DONE
