"""``pacs-ai-node config check`` and ``pacs-ai-node peers test``: an admin's view before and after a change.

    pacs-ai-node config check FILE                         would ``serve`` start with this config?
    pacs-ai-node peers test [--config FILE] [--timeout S]  does every destination answer, with its credentials?

``config check`` makes the checks ``serve`` makes before it binds a port,
without binding one or loading a model into onnxruntime, and writes nothing
but a probe file in the data dir, removed at once: the config file (every
key and type), the TLS certificate, key and CA files of the node's listeners
and of each destination, the credentials of each destination that reads them
from the environment, every enabled model bundle (manifest schema and the
sha256 of every artifact), the rules file, the data dir, and ports that
would collide. It prints ``OK:`` and the effective configuration, or one
``error:`` line per problem naming the key. Run it as the service's user
(``sudo -u pacs-ai-node``), in the service's environment.

``peers test`` sends a C-ECHO to every DICOM destination (over TLS where the
destination says so; the reason an association was rejected is shown) and an
authenticated QIDO-RS query (``GET {url}/studies?limit=1``, the sender's
credentials, certificate checks and client certificate) to every DICOMweb
one, all at once, each bounded by ``--timeout``; then prints one table row
per destination.

Exit status: ``config check`` 0 valid, 2 not; ``peers test`` 0 when every
destination answered with success, 1 when one did not (or none is
configured), 2 for a config that does not load.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar

from node.cli.arguments import seconds_within
from node.config import DICOMWEB, ConfigError, Destination, NodeConfig, load_config
from node.send.connect import dicomweb_session, host_port
from node.send.probe import PeerResult, echo_destination, peer_address, probe_peers, query_dicomweb

EXIT_OK = 0
EXIT_PEER_FAILED = 1
EXIT_INVALID = 2
#: Default bound on each connection attempt and each answer of ``peers test``, in seconds.
DEFAULT_PEER_TIMEOUT_S = 5.0
_WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def add_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``config check`` and ``peers test`` on the node's top-level subparsers."""
    config = subparsers.add_parser("config", help="the node's configuration file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate a config file as `serve` would, without starting anything",
        description="Load FILE and make every check `serve` makes before it binds a port (keys and types, "
        "TLS files, destination credentials, model bundles and their sha256, rules file, data dir, ports). "
        "Exit 0 and print the effective configuration when it is valid; otherwise exit 2 with one line per "
        "problem, naming the key.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="TOML config file (see deploy/node.example.toml)")
    check.set_defaults(func=cmd_config_check)

    peers = subparsers.add_parser("peers", help="the destinations the node sends results to")
    peers_sub = peers.add_subparsers(dest="peers_command", required=True)
    test = peers_sub.add_parser(
        "test",
        help="C-ECHO every DICOM destination and query every DICOMweb one (QIDO-RS)",
        description="C-ECHO each DICOM destination (with TLS where configured) and send an authenticated "
        "QIDO-RS query (GET {url}/studies?limit=1) to each DICOMweb destination, with the node's AE title and "
        "the sender's credentials. Prints one row per destination. Exit 0 when all answered with success, "
        "1 otherwise (or when no destination is configured), 2 when the config does not load.",
    )
    test.add_argument("--config", type=Path, metavar="FILE", help="TOML config file with [send] destinations")
    test.add_argument("--timeout", type=seconds_within(600), default=DEFAULT_PEER_TIMEOUT_S, metavar="S",
                      help=f"seconds for each connection and each answer (default {DEFAULT_PEER_TIMEOUT_S:g})")
    test.set_defaults(func=cmd_peers_test)


# -- config check -------------------------------------------------------------


@dataclass(frozen=True)
class ConfigReport:
    """What ``config check`` found: the loaded config (None when it does not load), problems, notes."""

    config: NodeConfig | None
    problems: list[str]
    warnings: list[str]
    bundles: list[str]
    rules: str

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.problems


def check_config(path: Path | str) -> ConfigReport:
    """Load ``path`` and make the checks ``serve`` makes before binding; nothing is started.

    The file itself stops at its first error (the loader names the key); the
    checks after loading each report every problem they find.
    """
    try:
        config = load_config(path)
    except ConfigError as exc:
        return ConfigReport(None, [str(exc)], [], [], "")
    problems: list[str] = []
    warnings: list[str] = []
    problems += _port_problems(config, warnings)
    problems += _tls_problems(config)
    problems += _destination_problems(config, warnings)
    bundles, bundle_problems = _bundle_report(config)
    problems += bundle_problems
    rules, rules_problems = _rules_report(config)
    problems += rules_problems
    problems += _data_dir_problems(config, warnings)
    return ConfigReport(config, problems, warnings, bundles, rules)


def _port_problems(config: NodeConfig, warnings: list[str]) -> list[str]:
    """Ports the node's listeners would both bind (the loader checks ranges and TLS vs DICOM)."""
    listeners = [("node.port", config.port, config.bind_address)]
    if config.tls_port:
        listeners.append(("tls.tls_port", config.tls_port, config.bind_address))
    if config.http_port:
        listeners.append(("http.http_port", config.http_port, config.http_bind_address))
    problems = []
    for i, (key, port, address) in enumerate(listeners):
        for other_key, other_port, other_address in listeners[:i]:
            overlap = address == other_address or {address, other_address} & set(_WILDCARD_ADDRESSES)
            if port == other_port and overlap:
                problems.append(f"{key}: {port} is also {other_key}; two listeners cannot bind one port")
        if port < 1024:
            warnings.append(f"{key}: {port} is a privileged port; the process needs CAP_NET_BIND_SERVICE, which "
                            "the shipped systemd unit and container do not grant (use a port >= 1024)")
    return problems


def _tls_problems(config: NodeConfig) -> list[str]:
    """The listeners' certificate, key and CA files exist and load (as ``serve`` loads them)."""
    if not (config.tls_port or config.http_tls):
        return []
    missing = [f"tls.{key}: {path} not found" for key in ("tls_cert_file", "tls_key_file", "tls_ca_file")
               if (path := getattr(config, key)) is not None and not Path(path).is_file()]
    if missing:
        return missing
    try:
        config.server_ssl_context()
    except ConfigError as exc:
        return [f"tls.tls_cert_file / tls_key_file / tls_ca_file: {exc}"]
    return []


def _destination_problems(config: NodeConfig, warnings: list[str]) -> list[str]:
    """What the sender checks at start: credentials from the environment and TLS files that load."""
    from node.send.connect import client_ssl_context

    problems = []
    for i, destination in enumerate(config.destinations):
        key = f"send.destinations[{i}]"
        try:
            if destination.secret() and destination.kind == DICOMWEB and destination.url.startswith("http:"):
                warnings.append(f"{key}.url: credentials would be sent over plain http to {destination.url}")
        except ConfigError as exc:
            problems.append(f"{key}.{exc}")
        if destination.tls or (destination.kind == DICOMWEB and destination.tls_cert_file):
            try:
                client_ssl_context(destination)
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"{key}: TLS files cannot be loaded: {exc}")
    return problems


def _bundle_report(config: NodeConfig) -> tuple[list[str], list[str]]:
    """One line per enabled bundle (manifest and every artifact's sha256 checked), and the problems."""
    from pipelines.errors import PacsAiError
    from pipelines.model.bundle import ModelBundle

    try:
        folders = config.model_dirs
    except ConfigError as exc:
        return [], [f"models.{exc}"]
    lines, problems = [], []
    for folder in folders:
        key = f"models.{'enabled_models' if config.enabled_models else 'models_dir'} ({folder.name})"
        try:
            bundle = ModelBundle(folder, verify_only=True)
        except PacsAiError as exc:
            problems.append(f"{key}: {exc}")
            continue
        m = bundle.manifest
        artifacts = f"{len(m.artifacts)} artifact{'s' if len(m.artifacts) != 1 else ''}"
        lines.append(f"{m.id} {m.version} ({os.path.normpath(folder)}, {artifacts}, sha256 ok)")
    if config.require_gpu:
        problems += _gpu_problems()
    return lines, problems


def _gpu_problems() -> list[str]:
    """With ``require_gpu``, a GPU execution provider must be usable here (driver and onnxruntime)."""
    from pipelines.model.bundle import GPU_PROVIDERS, NVIDIA_DRIVER, default_providers

    try:
        import onnxruntime
    except ImportError as exc:
        return [f"models.require_gpu: onnxruntime cannot be imported ({exc})"]
    available = onnxruntime.get_available_providers()
    if not any(p in GPU_PROVIDERS for p in default_providers(available)):
        driver = "present" if NVIDIA_DRIVER.exists() else f"absent ({NVIDIA_DRIVER} not found)"
        return [f"models.require_gpu: no GPU execution provider here (NVIDIA driver {driver}; onnxruntime "
                f"offers {', '.join(available)})"]
    return []


def _rules_report(config: NodeConfig) -> tuple[str, list[str]]:
    from pipelines.rules.ruleset import RulesError, RuleSet

    try:
        rules = RuleSet.load(config.rules_file)
    except RulesError as exc:
        return "", [f"series.rules_file: {exc}"]
    which = "built-in default rules" if config.rules_file is None else "rules file"
    return f"{which} {rules.source} ({len(rules.rules)} rules)", []


def _data_dir_problems(config: NodeConfig, warnings: list[str]) -> list[str]:
    """The data dir is a writable folder, or can be created; what is already in it is writable."""
    data_dir = Path(os.path.normpath(config.data_dir))
    if data_dir.exists():
        if not data_dir.is_dir():
            return [f"node.data_dir: {data_dir} exists and is not a folder"]
        try:
            with tempfile.TemporaryFile(dir=data_dir, prefix=".config-check-"):
                pass
        except OSError as exc:
            return [f"node.data_dir: {data_dir} is not writable by this user ({exc.strerror or exc})"]
        problems = [f"node.data_dir: {path} is not writable by this user"
                    for path in (config.spool_dir, config.results_dir, data_dir / "audit", data_dir / "quarantine",
                                 config.state_path, config.state_path.with_name(config.state_path.name + "-wal"),
                                 config.state_path.with_name(config.state_path.name + "-shm"))
                    if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0))]
        if problems:
            return problems
        existing = data_dir
    else:
        existing = data_dir.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return [f"node.data_dir: {data_dir} cannot be created: {existing} is not a folder"]
        if not os.access(existing, os.W_OK | os.X_OK):
            return [f"node.data_dir: {data_dir} cannot be created: {existing} is not writable by this user"]
        warnings.append(f"node.data_dir: {data_dir} does not exist yet; serve creates it")
    free_mb = shutil.disk_usage(existing).free // 2**20
    if free_mb < config.min_free_disk_mb:
        warnings.append(f"node.min_free_disk_mb: {free_mb} MiB free under {existing}, below "
                        f"{config.min_free_disk_mb}: C-STORE would be refused with 0xA700 (out of resources)")
    return []


def _summary(path: Path, report: ConfigReport) -> list[str]:
    config = report.config
    assert config is not None
    dicom = f"AE title {config.ae_title}, DICOM {host_port(config.bind_address, config.port)}"
    if config.tls_port:
        dicom += f", DICOM TLS {host_port(config.bind_address, config.tls_port)}" + (
            " (client certificate required)" if config.tls_require_client_cert else "")
    callers = ", ".join(config.allowed_calling_ae_titles) or "any calling AE title"
    if config.http_port:
        scheme = "https" if config.http_tls else "http"
        http = (f"STOW-RS {scheme}://{host_port(config.http_bind_address, config.http_port)}/studies, "
                + ("basic authentication" if config.http_username else "no authentication"))
    else:
        http = "no HTTP port"
    destinations = [f"{d} ({_where(d)}; {', '.join(d.results)})" for d in config.destinations] or [
        "none: results stay in the outbox"]
    lines = [
        f"OK: {path}",
        f"  node          {dicom}; callers: {callers}",
        f"  http          {http}",
        f"  data dir      {os.path.normpath(config.data_dir)}",
    ]
    lines += [f"  {'destinations' if i == 0 else '':<13} {d}" for i, d in enumerate(destinations)]
    lines += [f"  {'bundles' if i == 0 else '':<13} {b}" for i, b in enumerate(report.bundles)]
    lines.append(f"  rules         {report.rules}")
    lines.append(f"  watching      {_watching(config)}")
    lines.append(f"  retention     received instances {_kept(config.retain_input_days, 'processing')}, "
                 f"results {_kept(config.retain_results_days, 'delivery')}")
    return lines


def _watching(config: NodeConfig) -> str:
    if not config.http_port:
        pages = "status pages and metrics off (no HTTP port)"
    else:
        status = "on" if config.status_page_enabled else "off"
        why = " (auto: HTTP is not on loopback only)" if config.status_page == "auto" and status == "off" else ""
        pages = f"status pages {status}{why}, /metrics {'on' if config.metrics_endpoint else 'off'}"
    audit = "audit trail in data dir/audit" + (f" and syslog {config.audit_syslog}" if config.audit_syslog else "")
    return f"{pages}; {audit}; logs {config.log_format} at {config.log_level.upper()}"


def _kept(days: float, after: str) -> str:
    return "kept forever" if days == 0 else f"deleted {days:g} days after {after}"


def _where(destination: Destination) -> str:
    if destination.kind == DICOMWEB:
        return f"dicomweb {destination.url}"
    where = f"dicom {destination.ae_title}@{host_port(destination.host, destination.port)}"
    return where + (", TLS" if destination.tls else "")


def cmd_config_check(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the effective configuration (exit 0) or one line per problem (exit 2)."""
    out, err = out or sys.stdout, err or sys.stderr
    report = check_config(args.file)
    for line in report.warnings:
        print(f"warning: {line}", file=err)
    if not report.ok:
        for line in report.problems:
            print(f"error: {line}", file=err)
        print(f"{args.file}: {len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}; "
              "`serve` would not start with it", file=err)
        return EXIT_INVALID
    for line in _summary(args.file, report):
        print(line, file=out)
    return EXIT_OK


# -- peers test ---------------------------------------------------------------


def format_peer_table(results: list[PeerResult]) -> list[str]:
    """One row per destination: name, kind, address, result, round trip (ms), error."""
    header = ("name", "kind", "address", "result", "rtt ms", "error")
    rows = [(str(r.destination), r.destination.kind, peer_address(r.destination), r.result,
             f"{r.rtt_ms:.1f}" if r.rtt_ms is not None else "-", r.error) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                 row[3].ljust(widths[3]), row[4].rjust(widths[4]), row[5]]
        lines.append("  ".join(cells).rstrip())
    return lines


def cmd_peers_test(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the table; exit 0 when every destination answered with success."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    if not config.destinations:
        print(f"no destinations configured{f' in {args.config}' if args.config else ''} ([send] destinations): "
              "nothing to test", file=err)
        return EXIT_PEER_FAILED
    # pynetdicom logs every refused connection at ERROR; the table says it once, with the reason.
    netlog = logging.getLogger("pynetdicom")
    level = netlog.level
    netlog.setLevel(logging.CRITICAL)
    try:
        results = probe_peers(config, args.timeout)
    finally:
        netlog.setLevel(level)
    for line in format_peer_table(results):
        print(line, file=out)
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} destinations answered with success"
          + (f"; {failed} failed" if failed else "") + f" (calling AE title {config.ae_title})", file=out)
    return EXIT_PEER_FAILED if failed else EXIT_OK


__all__ = [
    "ConfigReport", "PeerResult", "add_parser", "check_config", "cmd_config_check", "cmd_peers_test",
    "dicomweb_session", "echo_destination", "format_peer_table", "probe_peers", "query_dicomweb",
]
