"""One typed configuration object, read from TOML and overridden by flags.

Every key is documented in ``deploy/node.example.toml``; unknown keys and wrong
types are errors that name the key, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import ssl

    from pipelines.clinical.risk import RiskPolicy
from urllib.parse import urlsplit

from pipelines.errors import PacsAiError

DEFAULT_AE_TITLE = "AINODE"
DEFAULT_PORT = 11112
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Environment variable naming the models folder when the config file does not (``[models] models_dir``).
MODELS_ENV = "PACS_AI_NODE_MODELS"
#: Environment variable naming the config file when the command line does not (``--config``).
CONFIG_ENV = "PACS_AI_NODE_CONFIG"
#: The config file a system-wide install reads when neither ``--config`` nor ``$PACS_AI_NODE_CONFIG`` names one.
SYSTEM_CONFIG = Path("/etc/pacs-ai-node/node.toml")
#: What the log says when no config file was found (``--config``, ``$PACS_AI_NODE_CONFIG``, /etc).
EMBEDDED_DEFAULTS = "embedded defaults"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash/control


class ConfigError(PacsAiError):
    """A configuration value is missing, unknown or invalid (the message names it)."""


def validate_ae_title(value: str, key: str) -> str:
    """Return ``value`` stripped; raise ConfigError if it is not a valid AE title."""
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


#: Result types a destination can take (PS3.3 modality of the result object;
#: "SC" is any Secondary Capture Image Storage class, "PR" any presentation state).
RESULT_TYPES = ("SEG", "SR", "KO", "SC", "PR")
#: Transfer syntaxes the sender can produce from the stored Explicit VR Little
#: Endian files without touching pixel data (PS3.5 A.1, A.2, A.5).
TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "deflated": "1.2.840.10008.1.2.1.99",
}
DICOM, DICOMWEB = "dicom", "dicomweb"
#: How long an undelivered item is retried before it goes to the dead letters.
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def result_type(modality: str, sop_class_uid: str) -> str:
    """The result type (``SEG``, ``SR``, ``KO``, ``SC``, ``PR``) of an object, from its Modality and SOP Class."""
    if modality in ("SEG", "SR", "KO", "PR"):
        return modality
    if sop_class_uid == _SECONDARY_CAPTURE or sop_class_uid.startswith(_SECONDARY_CAPTURE + "."):
        return "SC"
    return modality


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM peer (C-STORE SCP) or a DICOMweb server (STOW-RS).

    The constructor validates every field and raises :class:`ConfigError`
    naming it; :func:`load_config` prefixes ``send.destinations[i].``.
    ``str(destination)`` (the name) is the outbox key of its items.
    """

    ae_title: str = ""
    host: str = ""
    port: int = 0
    name: str = ""
    kind: str = DICOM
    url: str = ""
    results: tuple[str, ...] = RESULT_TYPES
    transfer_syntax: str = TRANSFER_SYNTAXES["explicit"]
    tls: bool = False
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    username: str = ""
    password: str = field(default="", repr=False)
    password_env: str = ""
    bearer_token: str = field(default="", repr=False)
    token_env: str = ""
    confirm: bool = False
    max_attempts: int = 0
    max_age_s: float = DEFAULT_MAX_AGE_S

    def __post_init__(self) -> None:
        if self.kind not in (DICOM, DICOMWEB):
            raise ConfigError(f"kind: {self.kind!r} is not \"dicom\" or \"dicomweb\"")
        bad = [r for r in self.results if r not in RESULT_TYPES]
        if bad or not self.results:
            raise ConfigError(f"results: {list(self.results)!r} must be a non-empty list of {', '.join(RESULT_TYPES)}")
        if self.transfer_syntax not in TRANSFER_SYNTAXES.values():
            raise ConfigError(f"transfer_syntax: {self.transfer_syntax!r} is not one of "
                              f"{', '.join(f'{k} ({v})' for k, v in TRANSFER_SYNTAXES.items())}")
        if self.max_attempts < 0:
            raise ConfigError(f"max_attempts: must be >= 0 (0 = no limit), got {self.max_attempts}")
        if self.max_age_s < 0:
            raise ConfigError(f"max_age_s: must be >= 0 (0 = no limit), got {self.max_age_s}")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ConfigError("tls_key_file: needs tls_cert_file")
        if self.kind == DICOM:
            self._check_dicom()
        else:
            self._check_dicomweb()

    def _check_dicom(self) -> None:
        validate_ae_title(self.ae_title, "ae_title")
        if not self.host:
            raise ConfigError("host: missing")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} out of range 1-65535")
        for key in ("url", "username", "password", "password_env", "bearer_token", "token_env", "confirm"):
            if getattr(self, key):
                raise ConfigError(f"{key}: only for kind = \"dicomweb\""
                                  + (" (Storage Commitment is not implemented)" if key == "confirm" else ""))

    def _check_dicomweb(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"url: {self.url!r} is not an http:// or https:// URL")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError(f"url: {self.url!r} must have no user, query or fragment "
                              "(credentials go in username/password or bearer_token)")
        for key in ("ae_title", "host", "port", "tls"):
            if getattr(self, key):
                raise ConfigError(f"{key}: only for kind = \"dicom\" (the URL says where and whether TLS is used)")
        if self.password and self.password_env:
            raise ConfigError("password_env: give password or password_env, not both")
        if self.bearer_token and self.token_env:
            raise ConfigError("token_env: give bearer_token or token_env, not both")
        if (self.password or self.password_env) and not self.username:
            raise ConfigError("username: missing (a password was given)")
        if self.username and (self.bearer_token or self.token_env):
            raise ConfigError("bearer_token: give username/password or a bearer token, not both")

    @classmethod
    def parse(cls, text: str, key: str = "--send-to") -> Destination:
        """Parse ``AET@HOST:PORT`` (IPv6 hosts in brackets: ``AET@[::1]:104``)."""
        match = re.match(r"^(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)$", text.strip())
        if not match:
            raise ConfigError(f"{key}: {text!r} is not AET@HOST:PORT")
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ConfigError(f"{key}: port {port} out of range 1-65535")
        host = match["host"].strip("[]")
        aet = validate_ae_title(match["aet"], key)
        return cls(ae_title=aet, host=host, port=port, name=f"{aet}@{match['host']}:{port}")

    def __str__(self) -> str:
        if self.name:
            return self.name
        if self.kind == DICOMWEB:
            return self.url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"

    def wants(self, modality: str, sop_class_uid: str) -> bool:
        """Whether this destination takes a result object with this Modality and SOP Class."""
        return result_type(modality, sop_class_uid) in self.results

    def secret(self) -> tuple[str, str] | None:
        """``("basic", password)`` or ``("bearer", token)`` read now (from the environment when
        ``password_env`` / ``token_env`` is set); None without credentials.

        Raises ConfigError naming the key when the environment variable is not set.
        """
        for kind, value, env_key in (
            ("basic", self.password, "password_env"),
            ("bearer", self.bearer_token, "token_env"),
        ):
            variable = getattr(self, env_key)
            if variable:
                if variable not in os.environ:
                    raise ConfigError(f"{env_key}: environment variable {variable} is not set")
                return kind, os.environ[variable]
            if value:
                return kind, value
        if self.username:
            return "basic", ""
        return None


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node process needs; see ``deploy/node.example.toml``."""

    ae_title: str = DEFAULT_AE_TITLE
    port: int = DEFAULT_PORT
    bind_address: str = "0.0.0.0"
    data_dir: Path = Path("var")
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_pdu_size: int = 16384
    max_associations: int = 10
    max_connections: int = 64
    max_connections_per_address: int = 16
    artim_timeout_s: float = 30.0
    max_instance_mb: int = 2048
    #: ``[node] calling_ae_addresses``: (calling AE title, IP addresses / CIDR networks it may call from).
    calling_ae_addresses: tuple[tuple[str, tuple[str, ...]], ...] = ()
    min_free_disk_mb: int = 500
    network_timeout_s: float = 60.0
    series_quiet_seconds: float = 10.0
    complete_on_release: bool = True
    rules_file: Path | None = None
    http_port: int = 8080
    http_bind_address: str = "0.0.0.0"
    stow_max_request_mb: int = 4096
    http_max_concurrency: int = 16
    http_username: str = ""
    http_password: str = ""
    tls_port: int = 0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_require_client_cert: bool = False
    http_tls: bool = False
    destinations: tuple[Destination, ...] = ()
    send_retry_initial_s: float = 5.0
    send_retry_max_s: float = 300.0
    send_connect_timeout_s: float = 10.0
    send_dimse_timeout_s: float = 60.0
    #: Default: :func:`default_models_dir` (``$PACS_AI_NODE_MODELS``, the checkout, the install prefix).
    models_dir: Path = field(default_factory=lambda: default_models_dir())
    #: Bundle folder names under models_dir to run; empty: every bundle there.
    enabled_models: tuple[str, ...] = ()
    require_gpu: bool = False
    research_notice: str = "For research use only. Not for use in diagnostic procedures."
    seg_type: str = "BINARY"
    key_image_type: str = "SC"
    #: ``[results.risk]`` table (site -> [t1, t2, t3] score cut points, ``refer`` = tiers to refer).
    risk: RiskPolicy = field(default_factory=lambda: _default_risk())
    log_level: str = "INFO"
    log_format: str = "text"
    log_patient_identity: bool = False
    status_page: str = "auto"
    metrics_endpoint: bool = True
    audit_syslog: str = ""
    audit_patient_identity: bool = False
    retain_input_days: float = 30.0
    retain_results_days: float = 30.0

    def __post_init__(self) -> None:
        from pipelines.clinical.findings import KEY_IMAGE_TYPES

        validate_ae_title(self.ae_title, "ae_title")
        for aet in self.allowed_calling_ae_titles:
            validate_ae_title(aet, "allowed_calling_ae_titles")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} out of range 1-65535")
        if self.max_pdu_size != 0 and self.max_pdu_size < 4096:
            raise ConfigError(f"max_pdu_size: {self.max_pdu_size} is too small (0 = the largest, 64 MiB; else >= 4096)")
        for name in ("series_quiet_seconds", "send_retry_initial_s", "send_retry_max_s", "send_connect_timeout_s",
                     "send_dimse_timeout_s", "network_timeout_s", "artim_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        names = [str(d) for d in self.destinations]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"destinations: {name!r} names two destinations (the name keys the outbox; "
                                  "give each a unique name)")
        if not 0 <= self.http_port < 65536:
            raise ConfigError(f"http_port: {self.http_port} out of range 0-65535 (0 = no HTTP port)")
        if not 0 <= self.tls_port < 65536:
            raise ConfigError(f"tls_port: {self.tls_port} out of range 0-65535 (0 = no DICOM TLS port)")
        if self.tls_port and self.tls_port == self.port:
            raise ConfigError(f"tls_port: {self.tls_port} is also the plain DICOM port")
        if (self.tls_port or self.http_tls) and not (self.tls_cert_file and self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file are needed for tls_port or http_tls")
        if self.tls_require_client_cert and not self.tls_ca_file:
            raise ConfigError("tls_require_client_cert needs tls_ca_file (the CA that signs client certificates)")
        if bool(self.http_username) != bool(self.http_password):
            raise ConfigError("http_username and http_password: set both (basic authentication) or neither")
        if self.stow_max_request_mb < 1:
            raise ConfigError(f"stow_max_request_mb: must be >= 1, got {self.stow_max_request_mb}")
        if not 1 <= self.http_max_concurrency <= 10000:
            raise ConfigError(f"http_max_concurrency: must be 1-10000, got {self.http_max_concurrency}")
        for name in ("max_associations", "max_connections", "max_connections_per_address", "max_instance_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_pdu_size > 2**32 - 1:
            raise ConfigError(f"max_pdu_size: {self.max_pdu_size} does not fit the 32-bit PDU length")
        for aet, networks in self.calling_ae_addresses:
            validate_ae_title(aet, "calling_ae_addresses")
            if not networks:
                raise ConfigError(f"calling_ae_addresses: {aet} has no address (remove the entry to allow any)")
            for network in networks:
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError:
                    raise ConfigError(f"calling_ae_addresses: {aet}: {network!r} is not an IP address or "
                                      "CIDR network") from None
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        if self.seg_type not in ("BINARY", "LABELMAP"):
            raise ConfigError(f"seg_type: {self.seg_type!r} is not 'BINARY' or 'LABELMAP'")
        if self.key_image_type not in KEY_IMAGE_TYPES:
            raise ConfigError(f"key_image_type: {self.key_image_type!r} is not "
                              f"{', '.join(repr(v) for v in KEY_IMAGE_TYPES[:-1])} or {KEY_IMAGE_TYPES[-1]!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: {self.log_format!r} is not 'text' or 'json'")
        if self.status_page not in ("auto", "on", "off"):
            raise ConfigError(f"status_page: {self.status_page!r} is not 'auto', 'on' or 'off'")
        if self.audit_syslog:
            host, _, port = self.audit_syslog.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"audit_syslog: {self.audit_syslog!r} is not HOST:PORT")
        for name in ("retain_input_days", "retain_results_days"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0 = keep forever), got {getattr(self, name)}")

    def server_ssl_context(self, client_certificates: bool = True) -> ssl.SSLContext:
        """TLS for the node's own listeners (PS3.15 B.12: TLS 1.2 or newer).

        With ``client_certificates`` (the DICOM TLS port), client certificates
        are requested when ``tls_ca_file`` is set and required when
        ``tls_require_client_cert`` is true; the HTTPS port relies on basic
        authentication instead.
        """
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(self.tls_cert_file), str(self.tls_key_file))
            if client_certificates and self.tls_ca_file:
                context.load_verify_locations(cafile=str(self.tls_ca_file))
                context.verify_mode = ssl.CERT_REQUIRED if self.tls_require_client_cert else ssl.CERT_OPTIONAL
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS certificate, key or CA file cannot be used: {exc}") from exc
        return context

    @property
    def status_page_enabled(self) -> bool:
        """The status pages: on, off, or ("auto") only when HTTP listens on loopback alone."""
        if self.status_page != "auto":
            return self.status_page == "on"
        import ipaddress

        try:
            return ipaddress.ip_address(self.http_bind_address).is_loopback
        except ValueError:
            return self.http_bind_address == "localhost"

    @property
    def audit_syslog_address(self) -> tuple[str, int] | None:
        if not self.audit_syslog:
            return None
        host, _, port = self.audit_syslog.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def model_dirs(self) -> list[Path]:
        """The bundle folders to load: ``enabled_models`` in order, or every bundle in ``models_dir``."""
        from pipelines.errors import ModelError
        from pipelines.model.bundle import discover_bundles

        if not self.enabled_models:
            try:
                found = discover_bundles(self.models_dir)
            except ModelError as exc:
                raise ConfigError(f"models_dir: {exc}") from None
            if not found:
                raise ConfigError(f"models_dir: no model bundle (folder with manifest.json) in {self.models_dir}")
            return found
        return [self.models_dir / name for name in self.enabled_models]

    def with_overrides(self, **overrides: Any) -> NodeConfig:
        """A copy with the non-None overrides applied (command-line flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_SECTIONS = {
    "node": {"ae_title", "port", "bind_address", "data_dir", "allowed_calling_ae_titles", "max_pdu_size",
             "max_associations", "min_free_disk_mb", "network_timeout_s", "log_level", "max_connections",
             "max_connections_per_address", "artim_timeout_s", "max_instance_mb", "calling_ae_addresses"},
    "http": {"http_port", "http_bind_address", "stow_max_request_mb", "http_max_concurrency", "http_username",
             "http_password"},
    "tls": {"tls_port", "tls_cert_file", "tls_key_file", "tls_ca_file", "tls_require_client_cert", "http_tls"},
    "series": {"series_quiet_seconds", "complete_on_release", "rules_file"},
    "send": {"destinations", "send_retry_initial_s", "send_retry_max_s", "send_connect_timeout_s",
             "send_dimse_timeout_s"},
    "models": {"models_dir", "enabled_models", "require_gpu"},
    "results": {"research_notice", "risk", "seg_type", "key_image_type"},
    "logging": {"log_format", "log_patient_identity"},
    "status": {"status_page", "metrics_endpoint"},
    "audit": {"audit_syslog", "audit_patient_identity"},
    "retention": {"retain_input_days", "retain_results_days"},
}


#: Type of each ``send.destinations`` key: the Python types allowed, or "path" / "list" (checked apart).
_DESTINATION_TYPES: dict[str, tuple[type, ...] | Literal["path", "list"]] = {
    "kind": (str,), "name": (str,), "ae_title": (str,), "host": (str,), "port": (int,), "url": (str,),
    "results": "list", "transfer_syntax": (str,), "tls": (bool,), "tls_verify": (bool,),
    "tls_ca_file": "path", "tls_cert_file": "path", "tls_key_file": "path", "username": (str,),
    "password": (str,), "password_env": (str,), "bearer_token": (str,), "token_env": (str,), "confirm": (bool,),
    "max_attempts": (int,), "max_age_s": (int, float),
}


def default_models_dir() -> Path:
    """Where the model bundles are when the config file does not say (``[models] models_dir``).

    The first of: ``$PACS_AI_NODE_MODELS`` (used even when it does not exist, so the error names
    it); the checkout's ``onnx_models/`` when running from a source tree (editable install or
    ``python -m``); ``<sys.prefix>/share/pacs-ai-node/onnx_models``, where a plain ``pip install``
    puts the bundled models (setup.cfg ``[options.data_files]``). When none exists, the last one,
    so that "no model bundle in ..." names the install location.
    """
    from_env = os.environ.get(MODELS_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    checkout = REPO_ROOT / "onnx_models"
    # setup.cfg next to the packages: a source tree, not site-packages (which has no onnx_models/).
    if checkout.is_dir() and (REPO_ROOT / "setup.cfg").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "pacs-ai-node" / "onnx_models"


def find_config(explicit: Path | str | None) -> tuple[Path | None, str]:
    """The config file a command reads, and why: ``(path, how)`` or ``(None, "embedded defaults")``.

    Searched in order: ``explicit`` (``--config``), ``$PACS_AI_NODE_CONFIG``, then
    ``/etc/pacs-ai-node/node.toml`` if it exists. A file named by the first two must exist
    (:func:`load_config` says so); the system file is only read when present.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit), "--config"
    from_env = os.environ.get(CONFIG_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser(), f"${CONFIG_ENV}"
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG, "system default"
    return None, EMBEDDED_DEFAULTS


def describe_config_source(path: Path | None, how: str) -> str:
    """One line for the log: which configuration a command runs with."""
    if path is None:
        return f"configuration: {EMBEDDED_DEFAULTS} (no --config, no ${CONFIG_ENV}, no {SYSTEM_CONFIG})"
    return f"configuration: {path} ({how})"


def _default_risk() -> RiskPolicy:
    from pipelines.clinical.risk import RiskPolicy

    return RiskPolicy()


def _destination(item: Any, key: str, base: Path) -> Destination:
    """One entry of ``send.destinations``: an ``AET@HOST:PORT`` string or a table."""
    if isinstance(item, str):
        return Destination.parse(item, key)
    if not isinstance(item, dict):
        raise ConfigError(f"{key}: expected a table or a string")
    unknown = set(item) - set(_DESTINATION_TYPES)
    if unknown:
        raise ConfigError(f"{key}: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, value in item.items():
        expected = _DESTINATION_TYPES[name]
        if expected == "path":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key}.{name}: expected a path string, got {value!r}")
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise ConfigError(f"{key}.{name}: {path} not found")
            values[name] = path
        elif expected == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key}.{name}: expected a list of strings, got {value!r}")
            values[name] = tuple(v.strip().upper() for v in value)
        elif not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            words = {str: "a string", int: "an integer", bool: "true or false"}
            raise ConfigError(f"{key}.{name}: expected {words.get(expected[0], 'a number')}, got {value!r}")
        else:
            values[name] = value
    if "max_age_s" in values:
        values["max_age_s"] = float(values["max_age_s"])
    if "transfer_syntax" in values:
        values["transfer_syntax"] = TRANSFER_SYNTAXES.get(values["transfer_syntax"].lower(), values["transfer_syntax"])
    kind = values.get("kind", DICOM)
    if kind == DICOM:
        for required in ("ae_title", "host", "port"):
            if required not in values:
                raise ConfigError(f"{key}: missing key {required!r}")
        host = values["host"].strip()
        values["host"] = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        values["ae_title"] = values["ae_title"].strip()
    elif kind == DICOMWEB and "url" not in values:
        raise ConfigError(f"{key}: missing key 'url'")
    try:
        destination = Destination(**values)
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc}") from None
    return destination if destination.name else replace(destination, name=str(destination))


def _coerce(key: str, value: Any, base: Path) -> Any:
    default = getattr(NodeConfig, key, None)
    if key in ("rules_file", "tls_cert_file", "tls_key_file", "tls_ca_file") and value == "":
        return None  # the built-in default rules / no file
    if key in ("data_dir", "models_dir", "rules_file", "tls_cert_file", "tls_key_file", "tls_ca_file"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if key == "risk":
        from pipelines.clinical.risk import RiskPolicy, RiskPolicyError

        if not isinstance(value, dict):
            raise ConfigError(f"results.risk: expected a table, got {value!r}")
        try:
            return RiskPolicy.from_mapping(value)
        except RiskPolicyError as exc:
            raise ConfigError(f"results.risk: {exc}") from None
    if key == "key_image_type":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value.strip().upper()  # "gsps", "none" read as the upper-case values
    if key == "enabled_models":
        if not isinstance(value, list) or not all(isinstance(v, str) and v and "/" not in v for v in value):
            raise ConfigError(f"{key}: expected a list of bundle folder names, got {value!r}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{key}: names a bundle twice: {value!r}")
        return tuple(value)
    if key == "allowed_calling_ae_titles":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of AE titles")
        return tuple(v.strip() for v in value)
    if key == "calling_ae_addresses":
        if not isinstance(value, dict) or not all(
            isinstance(v, list) and all(isinstance(a, str) for a in v) for v in value.values()
        ):
            raise ConfigError(f"{key}: expected a table of AE title = [addresses or CIDR networks], got {value!r}")
        return tuple((str(aet).strip(), tuple(a.strip() for a in v)) for aet, v in value.items())
    if key == "destinations":
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of tables or 'AET@HOST:PORT' strings")
        return tuple(_destination(item, f"send.destinations[{i}]", base) for i, item in enumerate(value))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported key")


def load_config(path: Path | str | None) -> NodeConfig:
    """Read a TOML config file (or the defaults when ``path`` is None).

    Relative paths in the file are relative to the file's folder.
    """
    if path is None:
        return NodeConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for section, content in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(sorted(_SECTIONS))})")
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: {section} must be a table")
        for key, value in content.items():
            if key not in _SECTIONS[section]:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            values[key] = _coerce(key, value, path.parent.resolve())
    try:
        return NodeConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


__all__ = [
    "CONFIG_ENV", "ConfigError", "Destination", "EMBEDDED_DEFAULTS", "MODELS_ENV", "NodeConfig", "RESULT_TYPES",
    "SYSTEM_CONFIG", "TRANSFER_SYNTAXES", "default_models_dir", "describe_config_source", "find_config",
    "load_config", "result_type", "validate_ae_title",
]
