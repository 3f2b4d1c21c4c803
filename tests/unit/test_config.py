"""TOML configuration -> NodeConfig: defaults, every key, path resolution, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import (
    DEFAULT_AE_TITLE,
    DEFAULT_MAX_AGE_S,
    DEFAULT_PORT,
    RESULT_TYPES,
    ConfigError,
    Destination,
    NodeConfig,
    load_config,
    result_type,
    validate_ae_title,
)
from support.data import REPO

FULL = """
[node]
ae_title = "SCREEN1"
port = 4242
bind_address = "127.0.0.1"
data_dir = "state"
allowed_calling_ae_titles = ["CT01", " CT02 "]
max_pdu_size = 65536
max_associations = 3
min_free_disk_mb = 1024
network_timeout_s = 30
log_level = "debug"

[series]
series_quiet_seconds = 2.5

[send]
destinations = [
  "PACS@pacs.example.org:104",
  "V6@[fe80::1]:11112",
  { ae_title = "ARCHIVE", host = "10.1.2.3", port = 4243, name = "long-term archive" },
  { ae_title = "V6TABLE", host = "::1", port = 104 },
]
send_retry_initial_s = 1
send_retry_max_s = 60.0
send_connect_timeout_s = 4.5
send_dimse_timeout_s = 20

[models]
models_dir = "/opt/models"
enabled_models = ["other-model"]
require_gpu = true

[results]
research_notice = "Research only."
"""


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --------------------------------------------------------------------------- defaults and a full file


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACS_AI_NODE_MODELS", raising=False)
    config = load_config(None)
    assert config == NodeConfig()
    assert config.ae_title == DEFAULT_AE_TITLE == "AINODE"
    assert config.port == DEFAULT_PORT == 11112
    assert config.destinations == ()
    assert config.allowed_calling_ae_titles == ()
    assert config.require_gpu is False
    assert config.models_dir == REPO / "onnx_models"
    assert REPO / "onnx_models" / "body-lungs" in config.model_dirs
    assert all(d.is_dir() for d in config.model_dirs)
    assert config.state_path == config.data_dir / "state.sqlite3"
    assert config.spool_dir == config.data_dir / "spool"
    assert config.results_dir == config.data_dir / "results"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == NodeConfig()


def test_full_file_with_every_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.ae_title == "SCREEN1"
    assert config.port == 4242
    assert config.bind_address == "127.0.0.1"
    assert config.data_dir == tmp_path.resolve() / "state"
    assert config.allowed_calling_ae_titles == ("CT01", "CT02")
    assert config.max_pdu_size == 65536
    assert config.max_associations == 3
    assert config.min_free_disk_mb == 1024
    assert config.network_timeout_s == 30.0 and isinstance(config.network_timeout_s, float)
    assert config.log_level == "debug"
    assert config.series_quiet_seconds == 2.5
    assert config.send_retry_initial_s == 1.0 and isinstance(config.send_retry_initial_s, float)
    assert config.send_retry_max_s == 60.0
    assert config.send_connect_timeout_s == 4.5
    assert config.send_dimse_timeout_s == 20.0 and isinstance(config.send_dimse_timeout_s, float)
    assert config.models_dir == Path("/opt/models")
    assert config.enabled_models == ("other-model",)
    assert config.model_dirs == [Path("/opt/models/other-model")]
    assert config.require_gpu is True
    assert config.research_notice == "Research only."
    assert config.destinations == (
        Destination("PACS", "pacs.example.org", 104, "PACS@pacs.example.org:104"),
        Destination("V6", "fe80::1", 11112, "V6@[fe80::1]:11112"),
        Destination("ARCHIVE", "10.1.2.3", 4243, "long-term archive"),
        Destination("V6TABLE", "::1", 104, "V6TABLE@[::1]:104"),
    )


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_file_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "ainode"
    folder.mkdir(parents=True)
    write(folder, '[node]\ndata_dir = "data"\n[models]\nmodels_dir = "../models"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The config path itself given relative to the working directory.
    config = load_config(Path("..") / "etc" / "ainode" / "node.toml")
    assert config.data_dir.is_absolute()
    assert config.data_dir == folder.resolve() / "data"
    assert config.models_dir.resolve() == (tmp_path / "etc" / "models").resolve()
    assert config.state_path == folder.resolve() / "data" / "state.sqlite3"


def test_absolute_and_home_paths_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, f'[node]\ndata_dir = "{tmp_path / "abs"}"\n[models]\nmodels_dir = "~/m"\n'))
    assert config.data_dir == tmp_path / "abs"
    assert config.models_dir == tmp_path / "home" / "m"


# --------------------------------------------------------------------------- errors name the key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[nodes]\nport = 1\n", ["unknown section [nodes]"]),
        ("[node]\nprot = 104\n", ["unknown key node.prot"]),
        ("[series]\nport = 104\n", ["unknown key series.port"]),
        ("[models]\nrequire_gpu = true\nmodle = 'x'\n", ["unknown key models.modle"]),
        ("node = 5\n", ["node must be a table"]),
        ('[node]\nport = "104"\n', ["port", "expected an integer"]),
        ("[node]\nport = 104.0\n", ["port", "expected an integer"]),
        ("[node]\nport = true\n", ["port", "expected an integer"]),
        ("[node]\nport = 70000\n", ["port", "out of range"]),
        ("[node]\nport = 0\n", ["port", "out of range"]),
        ('[node]\nae_title = "THIS-TITLE-IS-TOO-LONG"\n', ["ae_title", "not a valid AE title"]),
        ('[node]\nae_title = "A\\\\B"\n', ["ae_title", "not a valid AE title"]),
        ('[node]\nae_title = "   "\n', ["ae_title"]),
        ("[node]\nae_title = 7\n", ["ae_title", "expected a string"]),
        ('[node]\nallowed_calling_ae_titles = "CT01"\n', ["allowed_calling_ae_titles", "list"]),
        ('[node]\nallowed_calling_ae_titles = ["CT01", ""]\n', ["allowed_calling_ae_titles"]),
        ("[node]\nmax_pdu_size = 100\n", ["max_pdu_size", "too small"]),
        ("[node]\nmax_associations = 0\n", ["max_associations"]),
        ('[node]\nnetwork_timeout_s = "60"\n', ["network_timeout_s", "expected a number"]),
        ("[node]\nnetwork_timeout_s = 0\n", ["network_timeout_s", "must be > 0"]),
        ('[node]\nlog_level = "LOUD"\n', ["log_level", "'LOUD'"]),
        ("[node]\ndata_dir = 5\n", ["data_dir", "path string"]),
        ('[node]\ndata_dir = ""\n', ["data_dir", "path string"]),
        ('[series]\nseries_quiet_seconds = "ten"\n', ["series_quiet_seconds", "expected a number"]),
        ("[series]\nseries_quiet_seconds = -1\n", ["series_quiet_seconds", "must be > 0"]),
        ('[models]\nrequire_gpu = "yes"\n', ["require_gpu", "true or false"]),
        ("[models]\nrequire_gpu = 1\n", ["require_gpu", "true or false"]),
        ("[models]\nenabled_models = \"body-lungs\"\n", ["enabled_models", "expected a list of bundle folder names"]),
        ("[models]\nenabled_models = [\"a\", \"a\"]\n", ["enabled_models", "twice"]),
        ('[send]\ndestinations = "PACS@h:104"\n', ["destinations", "expected a list"]),
        ('[send]\ndestinations = ["PACS@h"]\n', ["send.destinations[0]", "AET@HOST:PORT"]),
        ('[send]\ndestinations = ["A@h:1", 104]\n', ["send.destinations[1]", "table or a string"]),
        ('[send]\ndestinations = [{ ae_title = "P", host = "h" }]\n', ["send.destinations[0]", "missing key 'port'"]),
        ('[send]\ndestinations = [{ ae_title = "P", host = "h", port = 1, tsl = true }]\n',
         ["send.destinations[0]", "unknown keys ['tsl']"]),
        ('[send]\ndestinations = [{ ae_title = "P", host = "h", port = 99999 }]\n',
         ["send.destinations[0]", "out of range"]),
        ("[send]\nsend_retry_max_s = false\n", ["send_retry_max_s", "expected a number"]),
        ("[results]\nresearch_notice = 1\n", ["research_notice", "expected a string"]),
        ("[node\nport = 1\n", ["not valid TOML"]),
    ],
)
def test_bad_config_raises_an_error_naming_the_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = config_error(tmp_path, text)
    for part in expected:
        assert part in message, message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


# --------------------------------------------------------------------------- destinations


@pytest.mark.parametrize(
    ("text", "aet", "host", "port"),
    [
        ("PACS@pacs.example.org:104", "PACS", "pacs.example.org", 104),
        ("ORTHANC@127.0.0.1:4242", "ORTHANC", "127.0.0.1", 4242),
        ("V6@[::1]:11112", "V6", "::1", 11112),
        ("V6@[2001:db8::7]:104", "V6", "2001:db8::7", 104),
        ("  MY AE@host:1  ", "MY AE", "host", 1),
        ("A@h:65535", "A", "h", 65535),
    ],
)
def test_destination_parse_good(text: str, aet: str, host: str, port: int) -> None:
    dest = Destination.parse(text)
    assert (dest.ae_title, dest.host, dest.port) == (aet, host, port)
    # str() gives back something parse accepts, IPv6 brackets included.
    assert Destination.parse(str(dest)) == dest


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pacs.example.org:104", "is not AET@HOST:PORT"),  # missing @
        ("PACS@pacs.example.org", "is not AET@HOST:PORT"),  # missing port
        ("PACS@host:", "is not AET@HOST:PORT"),
        ("PACS@host:abc", "is not AET@HOST:PORT"),
        ("PACS@host:-1", "is not AET@HOST:PORT"),
        ("PACS@::1:104", "is not AET@HOST:PORT"),  # IPv6 without brackets
        ("@host:104", "is not AET@HOST:PORT"),
        ("PACS@host:0", "out of range"),
        ("PACS@host:65536", "out of range"),
        ("ABCDEFGHIJKLMNOPQ@host:104", "not a valid AE title"),  # 17 characters
        ("A\\B@host:104", "not a valid AE title"),
        ("A\x01B@host:104", "not a valid AE title"),  # control character
        ("", "is not AET@HOST:PORT"),
    ],
)
def test_destination_parse_bad(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Destination.parse(text, "--send-to")
    assert str(info.value).startswith("--send-to: ")
    assert expected in str(info.value)


def test_validate_ae_title() -> None:
    assert validate_ae_title(" AINODE ", "k") == "AINODE"
    assert validate_ae_title("A" * 16, "k") == "A" * 16
    with pytest.raises(ConfigError, match="^k: "):
        validate_ae_title("A" * 17, "k")
    with pytest.raises(ConfigError, match="^k: "):
        validate_ae_title("tab\there", "k")


# --------------------------------------------------------------------------- overrides


def test_with_overrides_applies_only_non_none(tmp_path: Path) -> None:
    base = load_config(write(tmp_path, FULL))
    data_dir = tmp_path / "other"
    dest = Destination.parse("NEW@localhost:5000")
    changed = base.with_overrides(
        ae_title="OVERRIDE", port=None, data_dir=data_dir, destinations=(dest,), series_quiet_seconds=None,
        require_gpu=False,
    )
    assert changed.ae_title == "OVERRIDE"
    assert changed.port == 4242
    assert changed.data_dir == data_dir
    assert changed.destinations == (dest,)
    assert changed.series_quiet_seconds == 2.5
    assert changed.require_gpu is False  # False is a value, not "not given"
    assert changed.enabled_models == base.enabled_models
    # The original is unchanged (frozen dataclass, a copy is returned).
    assert base.ae_title == "SCREEN1" and base.require_gpu is True and len(base.destinations) == 4
    assert base.with_overrides() == base
    assert base.with_overrides(port=None, ae_title=None) == base


def test_with_overrides_validates() -> None:
    with pytest.raises(ConfigError, match="port"):
        NodeConfig().with_overrides(port=0)
    with pytest.raises(ConfigError, match="ae_title"):
        NodeConfig().with_overrides(ae_title="X" * 17)
    with pytest.raises(ConfigError, match="series_quiet_seconds"):
        NodeConfig().with_overrides(series_quiet_seconds=0)


# --------------------------------------------------------------------------- destination tables


def test_destination_tables_of_both_kinds(tmp_path: Path) -> None:
    for name in ("ca.pem", "node.pem", "node.key"):
        (tmp_path / "tls").mkdir(exist_ok=True)
        (tmp_path / "tls" / name).write_text("-----BEGIN-----\n")
    config = load_config(write(tmp_path, """
[send]
[[send.destinations]]
ae_title = "PACS"
host = "pacs.example.org"
port = 2762
tls = true
tls_ca_file = "tls/ca.pem"
tls_cert_file = "tls/node.pem"
tls_key_file = "tls/node.key"
transfer_syntax = "implicit"
results = ["seg", " SR "]
max_attempts = 5
max_age_s = 3600

[[send.destinations]]
name = "archive"
kind = "dicomweb"
url = "https://archive.example.org/dicom-web"
username = "ainode"
password_env = "ARCHIVE_PASSWORD"
tls_verify = false
confirm = true
results = ["SR"]

[[send.destinations]]
kind = "dicomweb"
url = "http://10.0.0.5:8042/dicom-web"
token_env = "PACS_TOKEN"
transfer_syntax = "1.2.840.10008.1.2.1.99"

[[send.destinations]]
ae_title = "V6"
host = "[::1]"
port = 104
"""))
    pacs, archive, token, v6 = config.destinations
    assert str(pacs) == pacs.name == "PACS@pacs.example.org:2762"
    assert (pacs.kind, pacs.tls, pacs.tls_verify) == ("dicom", True, True)
    assert pacs.tls_ca_file == tmp_path.resolve() / "tls" / "ca.pem"
    assert pacs.tls_key_file == tmp_path.resolve() / "tls" / "node.key"
    assert pacs.transfer_syntax == "1.2.840.10008.1.2"
    assert (pacs.results, pacs.max_attempts, pacs.max_age_s) == (("SEG", "SR"), 5, 3600.0)
    assert str(archive) == "archive" and archive.url == "https://archive.example.org/dicom-web"
    assert (archive.username, archive.password, archive.password_env) == ("ainode", "", "ARCHIVE_PASSWORD")
    assert (archive.tls_verify, archive.confirm, archive.results) == (False, True, ("SR",))
    assert archive.transfer_syntax == "1.2.840.10008.1.2.1" and archive.max_age_s == DEFAULT_MAX_AGE_S
    assert str(token) == "http://10.0.0.5:8042/dicom-web" and token.transfer_syntax == "1.2.840.10008.1.2.1.99"
    assert token.results == RESULT_TYPES and token.max_attempts == 0
    assert (v6.host, str(v6)) == ("::1", "V6@[::1]:104")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('{ kind = "hl7", url = "http://h" }', "send.destinations[0].kind: 'hl7' is not"),
        ('{ ae_title = "P", host = "h", port = 1, results = ["SEG", "PDF"] }', "send.destinations[0].results:"),
        ('{ ae_title = "P", host = "h", port = 1, results = [] }', "send.destinations[0].results:"),
        ('{ ae_title = "P", host = "h", port = 1, results = "SEG" }', "send.destinations[0].results: expected a list"),
        ('{ ae_title = "P", host = "h", port = 1, transfer_syntax = "1.2.840.10008.1.2.4.50" }',
         "send.destinations[0].transfer_syntax: '1.2.840.10008.1.2.4.50' is not one of explicit"),
        ('{ ae_title = "P", host = "h", port = true }', "send.destinations[0].port: expected an integer"),
        ('{ ae_title = "P", host = "h", port = 1, tls = "yes" }', "send.destinations[0].tls: expected true or false"),
        ('{ ae_title = "P", host = "h", port = 1, max_attempts = -1 }', "send.destinations[0].max_attempts: must be"),
        ('{ ae_title = "P", host = "h", port = 1, max_age_s = "1d" }', "send.destinations[0].max_age_s: expected a"),
        ('{ ae_title = "P", host = "h", port = 1, tls_ca_file = "absent.pem" }',
         "send.destinations[0].tls_ca_file: "),
        ('{ ae_title = "P", host = "h", port = 1, url = "http://h" }',
         'send.destinations[0].url: only for kind = "dicomweb"'),
        ('{ ae_title = "P", host = "h", port = 1, confirm = true }',
         "send.destinations[0].confirm: only for kind = \"dicomweb\" (Storage Commitment is not implemented)"),
        ('{ ae_title = "THIS-TITLE-IS-TOO-LONG", host = "h", port = 1 }', "send.destinations[0].ae_title:"),
        ('{ kind = "dicomweb" }', "send.destinations[0]: missing key 'url'"),
        ('{ kind = "dicomweb", url = "ftp://h/x" }', "send.destinations[0].url: 'ftp://h/x' is not an http"),
        ('{ kind = "dicomweb", url = "https://u:p@h/dicom-web" }', "send.destinations[0].url: 'https://u:p@h/"),
        ('{ kind = "dicomweb", url = "https://h", ae_title = "P" }', 'send.destinations[0].ae_title: only for kind'),
        ('{ kind = "dicomweb", url = "https://h", username = "u", password = "p", password_env = "P" }',
         "send.destinations[0].password_env: give password or password_env, not both"),
        ('{ kind = "dicomweb", url = "https://h", password = "p" }', "send.destinations[0].username: missing"),
        ('{ kind = "dicomweb", url = "https://h", username = "u", token_env = "T" }',
         "send.destinations[0].bearer_token: give username/password or a bearer token"),
        ('{ kind = "dicomweb", url = "https://h", bearer_token = "t", token_env = "T" }',
         "send.destinations[0].token_env: give bearer_token or token_env"),
        ('"A@h:1", { kind = "dicomweb", url = "https://h", name = "A@h:1" }',
         "destinations: 'A@h:1' names two destinations"),
    ],
)
def test_destination_errors_name_the_key(tmp_path: Path, entry: str, expected: str) -> None:
    message = config_error(tmp_path, f"[send]\ndestinations = [{entry}]\n")
    assert expected in message, message


def test_secrets_come_from_the_environment_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    basic = Destination(kind="dicomweb", url="https://h", username="u", password_env="NODE_TEST_PW")
    monkeypatch.delenv("NODE_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="^password_env: environment variable NODE_TEST_PW is not set"):
        basic.secret()
    monkeypatch.setenv("NODE_TEST_PW", "from-env")
    assert basic.secret() == ("basic", "from-env")
    bearer = Destination(kind="dicomweb", url="https://h", bearer_token="t0ken")
    assert bearer.secret() == ("bearer", "t0ken")
    assert "t0ken" not in repr(bearer)
    assert Destination(kind="dicomweb", url="https://h").secret() is None
    assert "secret" not in repr(Destination(kind="dicomweb", url="https://h", username="u", password="secret"))


def test_result_types_per_destination() -> None:
    assert result_type("SEG", "1.2.840.10008.5.1.4.1.1.66.4") == "SEG"
    assert result_type("SR", "1.2.840.10008.5.1.4.1.1.88.34") == "SR"
    assert result_type("KO", "1.2.840.10008.5.1.4.1.1.88.59") == "KO"
    assert result_type("OT", "1.2.840.10008.5.1.4.1.1.7") == "SC"
    assert result_type("CT", "1.2.840.10008.5.1.4.1.1.7.4") == "SC"
    sr_only = Destination("P", "h", 104, results=("SR",))
    assert sr_only.wants("SR", "1.2.840.10008.5.1.4.1.1.88.34")
    assert not sr_only.wants("SEG", "1.2.840.10008.5.1.4.1.1.66.4")
    assert Destination("P", "h", 104).wants("SEG", "1.2.840.10008.5.1.4.1.1.66.4")


# --------------------------------------------------------------------------- where the config and the models are


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config, then $PACS_AI_NODE_CONFIG, then /etc/pacs-ai-node/node.toml when it exists, else the defaults."""
    import node.config as config_module

    system = tmp_path / "etc" / "node.toml"
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    monkeypatch.delenv(config_module.CONFIG_ENV, raising=False)
    assert config_module.find_config(None) == (None, config_module.EMBEDDED_DEFAULTS)
    assert "embedded defaults" in config_module.describe_config_source(None, config_module.EMBEDDED_DEFAULTS)

    system.parent.mkdir()
    write(system.parent, '[node]\nae_title = "SYSTEM"\n')
    assert config_module.find_config(None) == (system, "system default")

    from_env = write(tmp_path, '[node]\nae_title = "FROMENV"\n', "env.toml")
    monkeypatch.setenv(config_module.CONFIG_ENV, str(from_env))
    assert config_module.find_config(None) == (from_env, "$PACS_AI_NODE_CONFIG")
    explicit = tmp_path / "explicit.toml"
    assert config_module.find_config(explicit) == (explicit, "--config")
    assert str(explicit) in config_module.describe_config_source(explicit, "--config")

    # a file named by the environment must exist: the error names it rather than falling back
    monkeypatch.setenv(config_module.CONFIG_ENV, str(tmp_path / "missing.toml"))
    path, _ = config_module.find_config(None)
    with pytest.raises(ConfigError, match="missing.toml"):
        load_config(path)


def test_every_command_with_config_uses_the_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import node.config as config_module
    from node.cli.main import main

    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv(config_module.CONFIG_ENV, str(write(tmp_path, f'[models]\nmodels_dir = "{models}"\n')))
    assert main(["models", "list"]) == 0
    assert f"0 bundles in {models}" in capsys.readouterr().out
    monkeypatch.setenv(config_module.CONFIG_ENV, str(tmp_path / "missing.toml"))
    assert main(["outbox", "list"]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_models_dir_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$PACS_AI_NODE_MODELS, then the checkout's onnx_models/, then <sys.prefix>/share/pacs-ai-node/onnx_models."""
    import node.config as config_module

    monkeypatch.delenv(config_module.MODELS_ENV, raising=False)
    assert config_module.default_models_dir() == REPO / "onnx_models"
    assert NodeConfig().models_dir == REPO / "onnx_models"

    monkeypatch.setenv(config_module.MODELS_ENV, str(tmp_path / "site-models"))
    assert NodeConfig().models_dir == tmp_path / "site-models"
    # a config file's models_dir still wins over the environment
    assert load_config(write(tmp_path, '[models]\nmodels_dir = "/opt/models"\n')).models_dir == Path("/opt/models")

    monkeypatch.delenv(config_module.MODELS_ENV)
    installed = tmp_path / "site-packages"  # a plain install: the packages without the checkout around them
    installed.mkdir()
    monkeypatch.setattr(config_module, "REPO_ROOT", installed)
    monkeypatch.setattr(config_module.sys, "prefix", str(tmp_path / "venv"))
    assert config_module.default_models_dir() == tmp_path / "venv" / "share" / "pacs-ai-node" / "onnx_models"
