"""``pacs-ai-node``: the command line of the node.

    pacs-ai-node serve [--config FILE] [--data-dir DIR] [--ae-title AET] [--port N] [--http-port N]
                       [--send-to AET@HOST:PORT ...] [--quiet-seconds S]
    pacs-ai-node process INPUT_DIR --output DIR
    pacs-ai-node echo AET@HOST:PORT
    pacs-ai-node demo [--to AET@HOST:PORT] [--http-url URL] [--timeout S]
    pacs-ai-node series list
    pacs-ai-node rules check DIR_OR_FILES... [--rules FILE]
    pacs-ai-node outbox list|retry|purge ...
    pacs-ai-node --version

Every command and subcommand also takes ``-v/--verbose`` (repeatable: INFO, then DEBUG) and
``--log-level LEVEL``, which override the config's ``log_level``. A command's ``--config`` defaults
to ``$PACS_AI_NODE_CONFIG``, then ``/etc/pacs-ai-node/node.toml`` when it exists, else the
embedded defaults (:func:`node.config.find_config`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node import __version__
from node.config import (
    ConfigError,
    Destination,
    NodeConfig,
    describe_config_source,
    find_config,
    load_config,
    result_type,
)
from pipelines.errors import PacsAiError

LOG = logging.getLogger("node")

#: Log levels ``--log-level`` takes (those of the config's ``log_level``).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str, json: bool = False) -> None:
    """Plain lines or (``json``) one JSON object per line on stderr; pynetdicom, highdicom and
    uvicorn are held at WARNING (pynetdicom logs datasets, patient names included, at DEBUG)."""
    from node.observe.logs import configure_logging

    configure_logging(level, json=json)


def _config_from_args(args: argparse.Namespace) -> NodeConfig:
    config = load_config(args.config)
    overrides = {
        "data_dir": Path(args.data_dir) if getattr(args, "data_dir", None) else None,
        "ae_title": getattr(args, "ae_title", None),
        "port": getattr(args, "port", None),
        "http_port": getattr(args, "http_port", None),
        "series_quiet_seconds": getattr(args, "quiet_seconds", None),
        "destinations": tuple(Destination.parse(d) for d in args.send_to) if getattr(args, "send_to", None) else None,
        "enabled_models": _model_names(args.models) if getattr(args, "models", None) else None,
        "log_level": command_line_log_level(args),
    }
    return config.with_overrides(**overrides)


def _model_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--models: expected bundle folder names separated by commas, got {text!r}")
    return names


def command_line_log_level(args: argparse.Namespace) -> str | None:
    """The level ``--log-level`` or ``-v``/``-vv`` asks for (the former wins); None when neither was given."""
    level: str | None = getattr(args, "log_level", None)
    if level:
        return level.upper()
    verbose: int = getattr(args, "verbose", 0) or 0
    if verbose:
        return "INFO" if verbose == 1 else "DEBUG"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node until SIGTERM or SIGINT; SIGHUP reloads the config file with the same flags."""
    config = _config_from_args(args)
    setup_logging(config.log_level, json=config.log_format == "json")
    LOG.info("%s", getattr(args, "config_source", describe_config_source(args.config, "--config")))
    from node.service import Node  # heavy imports (onnxruntime) only when serving

    node = Node(config)

    def stop(signum: int, _frame: object) -> None:
        LOG.info("received %s", signal.Signals(signum).name)
        node.request_stop()

    def reload(_signum: int, _frame: object) -> None:
        try:
            new = _config_from_args(args)  # the file again, with the same command-line overrides
        except ConfigError as exc:
            LOG.error("configuration reload refused, nothing changed: %s", exc)
            return
        LOG.info("received SIGHUP: reloading %s", args.config or "the defaults")
        node.request_reload(new)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    node.run()
    return 0


def _group_by_series(folder: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """DICOM files under ``folder`` grouped by Series Instance UID; plus skipped-file reasons."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[Path]] = defaultdict(list)
    skipped = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError) as exc:
            skipped.append(f"{path.name}: not a DICOM file ({exc})")
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            skipped.append(f"{path.name}: no Series Instance UID")
            continue
        groups[uid].append(path)
    return groups, skipped


def cmd_process(args: argparse.Namespace) -> int:
    """Run the pipeline on every series of a folder and write the result files to ``--output``."""
    config = _config_from_args(args)
    setup_logging(config.log_level)
    from pydicom.dataset import Dataset
    from tqdm import tqdm

    from node.work.orchestrate import SeriesRefused, process_instances
    from node.work.results import build_analyzer, encode_dataset
    from pipelines.analysis import SeriesResult
    from pipelines.rules.ruleset import RuleSet

    folder = Path(args.input_dir)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    groups, skipped = _group_by_series(folder)
    if not groups:
        print(f"error: no DICOM series in {folder}", file=sys.stderr)
        return 1

    def write(result: SeriesResult) -> list[tuple[Dataset, Path]]:
        written = []
        for ds in result.objects:
            path = output / f"{result_type(str(ds.Modality), str(ds.SOPClassUID))}_{ds.SOPInstanceUID}.dcm"
            path.write_bytes(encode_dataset(ds))
            written.append((ds, path))
        return written

    rules = RuleSet.load(config.rules_file)
    analyzer = build_analyzer(config)
    processed, failures = 0, []
    stages = ["load", "eligibility", "inference", "postprocess", "encode", "write"]
    with tqdm(total=len(groups) * len(stages), unit="stage", disable=None, file=sys.stderr) as bar:
        for uid, paths in groups.items():
            done_before = bar.n

            def progress(stage: str, uid: str = uid) -> None:
                bar.set_description(f"series {uid[-12:]} {stage}")
                if stage != "rules":  # each later stage starts as the one before it ends
                    bar.update(1)

            try:
                outcome = process_instances(paths, rules, analyzer, write, progress=progress)
            except PacsAiError as exc:
                failures.append(f"series {uid}: {getattr(exc, 'reason', str(exc))}")
            else:
                if isinstance(outcome, SeriesRefused):
                    failures.append(f"series {uid}: {outcome.reason}")
                else:
                    processed += 1
                    summary = "; ".join(outcome.result.summary)
                    tqdm.write(f"series {uid}: processed ({summary})", file=sys.stdout)
            bar.update(len(stages) - (bar.n - done_before))
    for line in skipped:
        LOG.info("skipped %s", line)
    for line in failures:
        print(line, file=sys.stderr)
    print(f"{processed} series processed, {len(failures)} not; results in {output}")
    return 0 if processed else 1


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO one peer and print the status and round-trip time (exit 0 on Success)."""
    config = load_config(args.config)
    setup_logging(command_line_log_level(args) or "WARNING")
    from node.send.probe import echo_destination

    destination = Destination.parse(args.target, "target")
    if args.calling_ae:
        config = config.with_overrides(ae_title=args.calling_ae)
    result = echo_destination(destination, config, config.send_dimse_timeout_s,
                              connect_timeout=config.send_connect_timeout_s)
    setup_ms = result.setup_ms or 0.0
    if result.status is None:
        print(f"C-ECHO {destination}: no association (refused, rejected or unreachable) after {setup_ms:.1f} ms")
        return 1
    print(
        f"C-ECHO {destination}: status 0x{result.status:04X}, round trip {result.rtt_ms or 0.0:.1f} ms "
        f"(association set-up {setup_ms:.1f} ms)"
    )
    return 0 if result.status == 0 else 1


def cmd_series_list(args: argparse.Namespace) -> int:
    """Print each series the state database knows, its state and why it was rejected."""
    config = _config_from_args(args)
    from node.store.state import StateStore

    if not config.state_path.exists():
        print(f"no state database at {config.state_path}")
        return 1
    rows = StateStore(config.state_path).list_series(limit=args.limit)
    print(f"{'series instance uid':<66} {'state':<10} {'n':>5} {'last received':<19}  reason / result")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.last_received))
        print(f"{row.series_uid:<66} {row.state:<10} {row.instance_count:>5} {when:<19}  {row.reason or ''}")
    return 0


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose every command and subcommand takes ``-v/--verbose`` and ``--log-level``.

    ``add_subparsers`` makes subcommand parsers of the parser's own class, so the options reach
    subcommands declared in other modules (``node.cli.models``...) without each declaring them.
    Below the top level their default is SUPPRESS: a subcommand's default would otherwise
    overwrite ``pacs-ai-node -v serve``'s value (argparse copies subparser defaults last).
    """

    def __init__(self, *args: Any, top_level: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        group = self.add_argument_group("logging")
        group.add_argument("-v", "--verbose", action="count", default=0 if top_level else argparse.SUPPRESS,
                           help="more log output: -v INFO, -vv DEBUG (overrides the config's log_level)")
        group.add_argument("--log-level", type=_log_level, metavar="LEVEL",
                           default=None if top_level else argparse.SUPPRESS,
                           help=f"log level, one of {', '.join(LOG_LEVELS)} (overrides -v and the config's log_level)")


def build_parser() -> argparse.ArgumentParser:
    """The ``pacs-ai-node`` command line: every command, subcommand and flag."""
    parser = CommandParser(prog="pacs-ai-node", description="AI screening node for hospital PACS", top_level=True)
    parser.add_argument("--version", action="version", version=f"pacs-ai-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML config file (see deploy/node.example.toml)")
        p.add_argument("--data-dir", help="where the spool, results and state live (default ./var)")

    serve = sub.add_parser("serve", help="run the DICOM listener and everything behind it")
    common(serve)
    serve.add_argument("--ae-title", help="the node's AE title (default AINODE)")
    serve.add_argument("--port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--http-port", type=int, help="HTTP port for DICOMweb STOW-RS (default 8080; 0 = none)")
    serve.add_argument("--send-to", action="append", metavar="AET@HOST:PORT", help="result destination (repeatable)")
    serve.add_argument("--quiet-seconds", type=float, help="seconds without a new instance before a series is complete")
    serve.add_argument("--models", metavar="NAME[,NAME...]",
                       help="bundles to run (folder names under models_dir; default: models.enabled_models, else all)")
    serve.set_defaults(func=cmd_serve)

    process = sub.add_parser("process", help="run the pipeline offline on a folder of DICOM files")
    process.add_argument("input_dir", metavar="INPUT_DIR")
    process.add_argument("--output", required=True, metavar="DIR", help="where SEG and SR files are written")
    process.add_argument("--config", type=Path)
    process.add_argument("--models", metavar="NAME[,NAME...]", help="bundles to run (default: as serve)")
    process.set_defaults(func=cmd_process)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer and print the round-trip time")
    echo.add_argument("target", metavar="AET@HOST:PORT")
    echo.add_argument("--calling-ae", help="calling AE title (default: the node's)")
    echo.add_argument("--config", type=Path)
    echo.set_defaults(func=cmd_echo)

    series = sub.add_parser("series", help="series known to the node")
    series_sub = series.add_subparsers(dest="series_command", required=True)
    series_list = series_sub.add_parser("list", help="each series, its state, and why it was rejected")
    common(series_list)
    series_list.add_argument("--limit", type=int, default=100)
    series_list.set_defaults(func=cmd_series_list)

    from node.cli import demo as cli_demo

    cli_demo.add_parser(sub)
    from node.cli import rules as cli_rules

    cli_rules.add_parser(sub)
    from node.cli import outbox as cli_outbox

    cli_outbox.add_parser(sub)
    from node.cli import models as cli_models

    cli_models.add_parser(sub)
    from node.cli import admin as cli_admin

    cli_admin.add_parser(sub)
    return parser


def _resolve_config(args: argparse.Namespace) -> None:
    """Fill in ``args.config`` from the config search (``node.config.find_config``) for commands taking
    ``--config``, and ``args.config_source``, the log line that names what was found."""
    if not hasattr(args, "config"):
        return
    path, how = find_config(args.config)
    args.config = path
    args.config_source = describe_config_source(path, how)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``pacs-ai-node`` entry point: parse ``argv``, run the command, return its exit status."""
    args = build_parser().parse_args(argv)
    _resolve_config(args)
    level = command_line_log_level(args)
    if level is not None:
        # only when asked: without -v/--log-level each command keeps the output it always had
        setup_logging(level)
        if hasattr(args, "config_source") and args.func is not cmd_serve:
            LOG.info("%s", args.config_source)
    try:
        result: int = args.func(args)
        return result
    except (ConfigError, PacsAiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
