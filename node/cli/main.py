"""``pacs-ai-node``: the command line of the node.

    pacs-ai-node serve [--config FILE] [--data-dir DIR] [--ae-title AET] [--port N] [--http-port N]
                       [--send-to AET@HOST:PORT ...] [--quiet-seconds S]
    pacs-ai-node process INPUT_DIR --output DIR
    pacs-ai-node echo AET@HOST:PORT
    pacs-ai-node series list
    pacs-ai-node rules check DIR_OR_FILES... [--rules FILE]
    pacs-ai-node outbox list|retry|purge ...
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from node.config import ConfigError, Destination, NodeConfig, load_config, result_type
from pipelines.errors import PacsAiError, SeriesRejected

LOG = logging.getLogger("node")


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
    }
    return config.with_overrides(**overrides)


def _model_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--models: expected bundle folder names separated by commas, got {text!r}")
    return names


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    setup_logging(config.log_level, json=config.log_format == "json")
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
    config = _config_from_args(args)
    setup_logging(config.log_level)
    from tqdm import tqdm

    from node.service import build_analyzer, encode_dataset
    from pipelines.volume.ct import load_series

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
    from pipelines.rules.ruleset import RuleSet, screen_series

    rules = RuleSet.load(config.rules_file)
    analyzer = build_analyzer(config)
    processed, failures = 0, []
    stages = ["load", "eligibility", "inference", "postprocess", "encode", "write"]
    with tqdm(total=len(groups) * len(stages), unit="stage", disable=None, file=sys.stderr) as bar:
        for uid, paths in groups.items():
            done_before = bar.n
            try:
                bar.set_description(f"series {uid[-12:]} rules")
                decision = screen_series(paths, rules)
                if not decision.eligible:
                    raise SeriesRejected("; ".join(decision.reasons))
                bar.set_description(f"series {uid[-12:]} load")
                volume = load_series(paths)
                bar.update(1)

                def progress(stage: str) -> None:
                    bar.set_description(f"series {uid[-12:]} {stage}")
                    bar.update(1)

                result = analyzer.analyse(volume, progress=progress)
                for ds in result.objects:
                    kind = result_type(str(ds.Modality), str(ds.SOPClassUID))
                    (output / f"{kind}_{ds.SOPInstanceUID}.dcm").write_bytes(encode_dataset(ds))
                processed += 1
                summary = "; ".join(result.summary)
                tqdm.write(f"series {uid}: processed ({summary})", file=sys.stdout)
            except PacsAiError as exc:
                failures.append(f"series {uid}: {getattr(exc, 'reason', str(exc))}")
            bar.update(len(stages) - (bar.n - done_before))
    for line in skipped:
        LOG.info("skipped %s", line)
    for line in failures:
        print(line, file=sys.stderr)
    print(f"{processed} series processed, {len(failures)} not; results in {output}")
    return 0 if processed else 1


def cmd_echo(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    setup_logging("WARNING")
    from node.send.sender import echo

    destination = Destination.parse(args.target, "target")
    if args.calling_ae:
        config = config.with_overrides(ae_title=args.calling_ae)
    status, setup, rtt = echo(destination, config)
    if status is None:
        print(f"C-ECHO {destination}: no association (refused, rejected or unreachable) after {setup * 1000:.1f} ms")
        return 1
    print(
        f"C-ECHO {destination}: status 0x{status:04X}, round trip {rtt * 1000:.1f} ms "
        f"(association set-up {setup * 1000:.1f} ms)"
    )
    return 0 if status == 0 else 1


def cmd_series_list(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-ai-node", description="AI screening node for hospital PACS")
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

    from node.cli import rules as cli_rules

    cli_rules.add_parser(sub)
    from node.cli import outbox as cli_outbox

    cli_outbox.add_parser(sub)
    from node.cli import models as cli_models

    cli_models.add_parser(sub)
    from node.cli import admin as cli_admin

    cli_admin.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PacsAiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
