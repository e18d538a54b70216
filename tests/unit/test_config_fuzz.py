"""Property-based: whatever a user writes into any field of the configuration (file, variable or
flag), the exporter either accepts it or refuses it with one line naming the field; never a
traceback. The fields come from the schema itself (config.field_paths(), derived from the
dataclasses), so a field added later is covered without editing this test."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from exporter import config

REPO = Path(__file__).resolve().parents[2]
FIELDS = config.field_paths()
SECTIONS = sorted({path.split(".")[0] for path in FIELDS})

# what users get wrong: near-misses of every kind of field, beside arbitrary values
TRICKY = st.sampled_from([
    "", " ", "0", "-1", "1.5", "0s", "-5m", "5 m", "5mm", "1e3s", "soon", "inf", "nan", "1e999",
    "65536", "0x50", "99999999999999999999", ":", ":99999", "[::1]:", "host:port", "/", "/healthz",
    "metrics", "(", "[", "*", "a{99999999999}", "(?P<x>", "\\", "true", "yes", "maybe", "null",
    "~", "[a, b", "a,b,,c", "{}", "[]", "\x00", "é", "auto", "AUTO",
])
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2, 70000)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | TRICKY)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)


def yaml_safe(value: Any) -> bool:
    try:
        return yaml.safe_load(yaml.safe_dump(value)) == value or value != value  # NaN
    except yaml.YAMLError:
        return False


def accepted_or_one_line(load: Any, names: str) -> str | None:
    """None if the configuration loads; else the error, checked to be one line naming
    `names` (the field, or the unknown key)."""
    try:
        loaded = load()
    except config.ConfigError as e:
        message = str(e)
        assert "\n" not in message, message
        assert names in message, f"{names!r} not named in {message!r}"
        return message
    assert_usable(loaded)
    return None


def assert_usable(loaded: config.Config) -> None:
    """What is accepted must work at start too: no infinite or NaN number slips through."""
    def walk(value: Any) -> None:
        if isinstance(value, float):
            assert math.isfinite(value), loaded
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(dataclasses.asdict(loaded))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(FIELDS), value=VALUES)
def test_any_value_of_any_field_loads_or_names_the_field(path: str, value: Any):
    message = accepted_or_one_line(lambda: config.load(None, {}, {path: value}), path)
    if message is not None:
        assert message.startswith(path), message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(FIELDS), value=VALUES)
def test_any_value_in_a_config_file_loads_or_names_the_field(path: str, value: Any):
    assume(yaml_safe(value))
    section, key = path.split(".", 1)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump({section: {key: value}}, f)
        f.flush()
        message = accepted_or_one_line(lambda: config.load(f.name, {}, {}), path)
    if message is not None:
        assert message.startswith(f"{path} (from config file "), message


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(FIELDS), value=st.text(max_size=16) | TRICKY)
def test_any_environment_value_loads_or_names_the_field(path: str, value: str):
    assume("\x00" not in value)
    environ = {config.env_name(path): value}
    message = accepted_or_one_line(lambda: config.load(None, environ, {}), path)
    if message is not None:
        assert f"(from {config.env_name(path)})" in message


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(SECTIONS) | NAMES, key=NAMES, value=SCALARS)
def test_unknown_sections_and_keys_are_named(section: str, key: str, value: Any):
    assume(f"{section}.{key}" not in FIELDS)
    document = {section: {key: value}}
    unknown = key if section in SECTIONS else section
    message = accepted_or_one_line(
        lambda: config.build(config.flatten(document, "config file x.yaml")), repr(unknown)[1:-1])
    assert message is not None and "unknown" in message, message


@settings(max_examples=200, deadline=None)
@given(document=VALUES)
def test_any_document_shape_is_refused_in_one_line_or_loads(document: Any):
    assume(yaml_safe(document))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(document, f)
        f.flush()
        accepted_or_one_line(lambda: config.load(f.name, {}, {}), "config file")


def cli_check(document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(document, f)
    try:
        return subprocess.run([sys.executable, "-m", "exporter", "--config.file", f.name,
                               "--config.check"], capture_output=True, text=True, cwd=REPO,
                              timeout=60, env={k: v for k, v in os.environ.items()
                                               if not k.startswith(config.ENV_PREFIX)})
    finally:
        os.unlink(f.name)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(path=st.sampled_from(FIELDS), value=VALUES)
def test_the_real_cli_refuses_an_invalid_config_in_one_line_with_exit_2(path: str, value: Any):
    assume(yaml_safe(value))
    section, key = path.split(".", 1)
    document = {section: {key: value}}
    try:
        config.build(config.flatten(document, "f") | {
            p: v for p, v in config.flatten(config.default_document(), "d").items()
            if p != path})
    except config.ConfigError:
        pass
    else:
        assume(False)       # a valid value: not this test's business
    result = cli_check(document)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ebpf-net-exporter: {path} (from config file "), lines[0]
    assert "Traceback" not in result.stderr
