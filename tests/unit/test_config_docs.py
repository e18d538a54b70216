"""docs/configuration.md documents exactly the configuration keys of exporter/config.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from exporter import config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
BACKTICKED = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"([a-z_]+)\.([a-z_]+)")
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def test_every_key_is_documented(doc):
    missing = [path for path in config.field_paths() if f"`{path}`" not in doc]
    assert missing == [], "keys missing from docs/configuration.md"


def test_every_environment_variable_is_documented(doc):
    missing = [config.env_name(path) for path in config.field_paths()
               if not re.search(rf"\b{config.env_name(path)}\b", doc)]
    assert missing == [], "environment variables missing from docs/configuration.md"


def test_no_documented_key_is_unknown(doc):
    known = set(config.field_paths())
    sections = {path.split(".")[0] for path in known}
    unknown = set()
    for token in BACKTICKED.findall(doc):
        match = DOTTED.fullmatch(token)
        if match and match.group(1) in sections and token not in known:
            unknown.add(token)
    assert unknown == set(), "keys in docs/configuration.md that config.py does not have"


def test_example_config_files_are_valid(doc, tmp_path):
    """Every YAML block that is a mapping of known sections loads as a config file."""
    sections = {path.split(".")[0] for path in config.field_paths()}
    checked = 0
    for block in YAML_BLOCK.findall(doc):
        document = yaml.safe_load(block)
        if not isinstance(document, dict) or not set(document) <= sections:
            continue    # e.g. a Kubernetes env: snippet
        path = tmp_path / f"example{checked}.yaml"
        path.write_text(block)
        config.load(str(path), {}, {})
        checked += 1
    assert checked >= 1, "no example config file found in docs/configuration.md"
