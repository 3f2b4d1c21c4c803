"""The commented example config documents every key the node reads."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields

from node.config import NodeConfig, load_config
from support.data import REPO

EXAMPLE = REPO / "deploy" / "node.example.toml"


def test_example_config_loads_and_matches_defaults() -> None:
    config = load_config(EXAMPLE)
    default = NodeConfig()
    for f in fields(NodeConfig):
        if f.name in ("data_dir", "models_dir"):
            continue  # paths are relative to the file there
        assert getattr(config, f.name) == getattr(default, f.name), f.name
    assert config.models_dir.resolve() == (REPO / "onnx_models").resolve()


def test_every_field_is_documented_with_a_comment() -> None:
    text = EXAMPLE.read_text()
    keys = {key for section in tomllib.loads(text).values() for key in section}
    assert keys == {f.name for f in fields(NodeConfig)}
    for key in keys:
        # The line before each key (or its block) is a comment.
        # (A table such as [results.risk] has its comment above its header.)
        match = re.search(rf"((?:^#.*\n)+)^(?:{key} =|\[\w+\.{key}\])", text, re.MULTILINE)
        assert match, f"{key} has no comment above it in {EXAMPLE.name}"
