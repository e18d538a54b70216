"""The registry of collectors (exporter/registry.py): each collector setting wants its
registrations, and nothing runs with every collector off."""

from __future__ import annotations

import dataclasses

from exporter import config
from exporter.registry import REGISTRY


def only(name: str | None) -> config.Config:
    """The defaults with every collector off but `name`."""
    fields = [f.name for f in dataclasses.fields(config.CollectorsConfig)]
    return config.load(None, {}, {f"collectors.{f}": f == name for f in fields})


def test_each_collector_setting_wants_its_registrations() -> None:
    wanted = {name: [r.name for r in REGISTRY if r.wanted(only(name))]
              for name in (f.name for f in dataclasses.fields(config.CollectorsConfig))}
    # https has no family of its own: its requests and calls go to http and grpc
    assert wanted == {"flows": ["flows"], "tcp": ["tcp"], "dns": ["dns"],
                      "http": ["grpc", "http"], "https": ["grpc", "http"],
                      "drops": ["drops"], "bash": ["bash"]}


def test_nothing_is_wanted_with_every_collector_off() -> None:
    assert [r.name for r in REGISTRY if r.wanted(only(None))] == []
    assert len({r.name for r in REGISTRY}) == len(REGISTRY)
