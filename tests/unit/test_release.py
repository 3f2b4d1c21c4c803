"""Release conventions: one version everywhere, logging flags on every command, the files a release ships."""

from __future__ import annotations

import argparse
import configparser
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import node
from node.cli.main import build_parser, command_line_log_level, main
from support.data import REPO


def _commands(parser: argparse.ArgumentParser,
              path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser with its command words, the top level included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_version_is_single_sourced() -> None:
    assert node.__version__ == "0.1.0"
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: node.__version__"
    assert f"## [{node.__version__}] - " in (REPO / "CHANGELOG.md").read_text()


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pacs-ai-node {node.__version__}"


def test_version_from_the_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "node", "--version"], capture_output=True, text=True, cwd=REPO,
                         timeout=60, check=True).stdout
    assert out.strip() == "pacs-ai-node 0.1.0"


def test_implementation_version_name_follows_the_version() -> None:
    from node.receive.intake import IMPLEMENTATION_VERSION_NAME

    # PS3.7 D.3.3.2.4 / PS3.5 VR SH: at most 16 characters, no backslash or control characters
    assert IMPLEMENTATION_VERSION_NAME == f"PACSAINODE_{node.__version__}" == "PACSAINODE_0.1.0"
    assert len(IMPLEMENTATION_VERSION_NAME) <= 16
    assert "\\" not in IMPLEMENTATION_VERSION_NAME and IMPLEMENTATION_VERSION_NAME.isprintable()
    assert IMPLEMENTATION_VERSION_NAME in (REPO / "deploy" / "CONFORMANCE.md").read_text()


def test_every_command_takes_the_logging_flags() -> None:
    parser = build_parser()
    commands = list(_commands(parser))
    assert len(commands) > 20
    for words, sub in commands:
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"-v", "--verbose", "--log-level"} <= options, words


@pytest.mark.parametrize("argv, level", [
    (["series", "list"], None),
    (["series", "list", "-v"], "INFO"),
    (["-v", "series", "list"], "INFO"),
    (["-v", "series", "list", "-vv"], "DEBUG"),  # the innermost command's count wins (argparse subparsers)
    (["series", "-vv", "list"], "DEBUG"),
    (["series", "list", "-vvv", "--log-level", "warning"], "WARNING"),
    (["--log-level", "ERROR", "models", "list"], "ERROR"),
    (["outbox", "list", "--log-level", "debug"], "DEBUG"),
])
def test_logging_flags_anywhere_on_the_line(argv: list[str], level: str | None) -> None:
    assert command_line_log_level(build_parser().parse_args(argv)) == level


def test_log_level_flag_overrides_the_config(tmp_path: Path) -> None:
    from node.cli.main import _config_from_args

    config = tmp_path / "node.toml"
    config.write_text('[node]\nlog_level = "WARNING"\n')
    args = build_parser().parse_args(["series", "list", "--config", str(config), "-vv"])
    assert _config_from_args(args).log_level == "DEBUG"
    args = build_parser().parse_args(["series", "list", "--config", str(config)])
    assert _config_from_args(args).log_level == "WARNING"


def test_bad_log_level_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["series", "list", "--log-level", "CHATTY"])
    assert "'CHATTY' is not one of DEBUG, INFO, WARNING, ERROR" in capsys.readouterr().err


def test_verbose_logs_which_config_was_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("PACS_AI_NODE_CONFIG", raising=False)
    monkeypatch.setattr("node.config.SYSTEM_CONFIG", tmp_path / "absent.toml")
    with caplog.at_level(logging.INFO, logger="node"):
        main(["series", "list", "--data-dir", str(tmp_path), "-v"])
    assert "configuration: embedded defaults" in caplog.text
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\n')
    monkeypatch.setenv("PACS_AI_NODE_CONFIG", str(config))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node"):
        main(["series", "list", "-v"])
    assert f"configuration: {config} ($PACS_AI_NODE_CONFIG)" in caplog.text


def test_release_files() -> None:
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    for package in ("node", "pipelines"):
        assert (REPO / package / "py.typed").is_file()
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    classifiers = setup["metadata"]["classifiers"]
    for expected in ("License :: OSI Approved :: Apache Software License", "Typing :: Typed",
                     "Intended Audience :: Healthcare Industry", "Operating System :: POSIX :: Linux",
                     "Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.13"):
        assert expected in classifiers
    assert "py.typed" in setup["options.package_data"]["node"]
    assert "py.typed" in setup["options.package_data"]["pipelines"]


def test_data_files_ship_every_bundle_file_but_the_build_scripts() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    data_files = setup["options.data_files"]
    shipped = {f"{target}/{Path(line).name}": line.strip() for target, lines in data_files.items()
               for line in lines.split() if line.strip()}
    for bundle in sorted(p for p in (REPO / "onnx_models").iterdir() if (p / "manifest.json").is_file()):
        for file in sorted(p for p in bundle.iterdir() if p.is_file()):
            key = f"share/pacs-ai-node/onnx_models/{bundle.name}/{file.name}"
            if file.suffix == ".py":
                assert key not in shipped, f"{file} is a build/train script"
            else:
                assert shipped.get(key) == f"onnx_models/{bundle.name}/{file.name}", f"{file} is not installed"
