"""Running ``pacs-ai-node`` in-process, the way its entry point does, and writing its config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli.main import main


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``pacs-ai-node ARGV`` in this process: (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    """Write a config file ``name`` under ``tmp_path``; returns its path."""
    path = tmp_path / name
    path.write_text(text)
    return path
