"""One typed configuration object, read from TOML and overridden by flags.

Every key is documented in ``deploy/node.example.toml``; unknown keys and wrong
types are errors that name the key, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.errors import PacsAiError

DEFAULT_AE_TITLE = "AINODE"
DEFAULT_PORT = 11112
REPO_ROOT = Path(__file__).resolve().parent.parent

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash/control


class ConfigError(PacsAiError):
    """A configuration value is missing, unknown or invalid (the message names it)."""


def validate_ae_title(value: str, key: str) -> str:
    """Return ``value`` stripped; raise ConfigError if it is not a valid AE title."""
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives the node's results (C-STORE SCP)."""

    ae_title: str
    host: str
    port: int
    name: str = ""

    @classmethod
    def parse(cls, text: str, key: str = "--send-to") -> "Destination":
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
        return self.name or f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node process needs; see ``deploy/node.example.toml``."""

    ae_title: str = DEFAULT_AE_TITLE
    port: int = DEFAULT_PORT
    bind_address: str = "0.0.0.0"
    data_dir: Path = Path("var")
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_pdu_size: int = 0
    max_associations: int = 10
    min_free_disk_mb: int = 500
    network_timeout_s: float = 60.0
    series_quiet_seconds: float = 10.0
    complete_on_release: bool = True
    rules_file: Path | None = None
    http_port: int = 8080
    http_bind_address: str = "0.0.0.0"
    stow_max_request_mb: int = 4096
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
    models_dir: Path = REPO_ROOT / "onnx_models"
    model: str = "body-lungs"
    require_gpu: bool = False
    research_notice: str = "For research use only. Not for use in diagnostic procedures."
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        validate_ae_title(self.ae_title, "ae_title")
        for aet in self.allowed_calling_ae_titles:
            validate_ae_title(aet, "allowed_calling_ae_titles")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} out of range 1-65535")
        if self.max_pdu_size != 0 and self.max_pdu_size < 4096:
            raise ConfigError(f"max_pdu_size: {self.max_pdu_size} is too small (0 = unlimited, else >= 4096)")
        for name in ("series_quiet_seconds", "send_retry_initial_s", "send_retry_max_s", "send_connect_timeout_s",
                     "network_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
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
        if self.max_associations < 1:
            raise ConfigError(f"max_associations: must be >= 1, got {self.max_associations}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")

    def server_ssl_context(self, client_certificates: bool = True) -> "ssl.SSLContext":
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
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def model_dir(self) -> Path:
        return self.models_dir / self.model

    def with_overrides(self, **overrides: Any) -> "NodeConfig":
        """A copy with the non-None overrides applied (command-line flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_SECTIONS = {
    "node": {"ae_title", "port", "bind_address", "data_dir", "allowed_calling_ae_titles", "max_pdu_size",
             "max_associations", "min_free_disk_mb", "network_timeout_s", "log_level"},
    "http": {"http_port", "http_bind_address", "stow_max_request_mb", "http_username", "http_password"},
    "tls": {"tls_port", "tls_cert_file", "tls_key_file", "tls_ca_file", "tls_require_client_cert", "http_tls"},
    "series": {"series_quiet_seconds", "complete_on_release", "rules_file"},
    "send": {"destinations", "send_retry_initial_s", "send_retry_max_s", "send_connect_timeout_s"},
    "models": {"models_dir", "model", "require_gpu"},
    "results": {"research_notice"},
}


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _coerce(key: str, value: Any, base: Path) -> Any:
    default = getattr(NodeConfig, key, None)
    if key in ("rules_file", "tls_cert_file", "tls_key_file", "tls_ca_file") and value == "":
        return None  # the built-in default rules / no file
    if key in ("data_dir", "models_dir", "rules_file", "tls_cert_file", "tls_key_file", "tls_ca_file"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if key == "allowed_calling_ae_titles":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of AE titles")
        return tuple(v.strip() for v in value)
    if key == "destinations":
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of tables or 'AET@HOST:PORT' strings")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(Destination.parse(item, f"send.destinations[{i}]"))
            elif isinstance(item, dict):
                unknown = set(item) - {"ae_title", "host", "port", "name"}
                if unknown:
                    raise ConfigError(f"send.destinations[{i}]: unknown keys {sorted(unknown)}")
                try:
                    host = str(item["host"])
                    if _is_ipv6(host):
                        host = f"[{host}]"  # an IPv6 address given as its own key needs no brackets
                    dest = Destination.parse(f"{item['ae_title']}@{host}:{item['port']}",
                                             f"send.destinations[{i}]")
                except KeyError as exc:
                    raise ConfigError(f"send.destinations[{i}]: missing key {exc.args[0]!r}") from None
                out.append(replace(dest, name=item.get("name") or dest.name))
            else:
                raise ConfigError(f"send.destinations[{i}]: expected a table or a string")
        return tuple(out)
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


__all__ = ["ConfigError", "Destination", "NodeConfig", "load_config", "validate_ae_title"]
