"""What beside.py and switchable.py share: they run as `python SCRIPT ARGS python -m exporter
...` with a source tree as the working directory, patch that tree's exporter, then run it.
They import this module as a sibling (their own directory is first on sys.path)."""

from __future__ import annotations

import os
import runpy
import sys


def exporter_arguments(script: str, command: list[str]) -> list[str]:
    """The exporter's own arguments out of `python -m exporter ARGS...`; puts the tree's
    exporter package (the working directory) first on sys.path."""
    if command[1:3] != ["-m", "exporter"]:
        raise SystemExit(f"{script}: expected `python -m exporter ...`, got {command[:3]}")
    sys.path.insert(0, os.getcwd())
    return command[3:]


def run_exporter(arguments: list[str]) -> None:
    sys.argv = ["exporter", *arguments]
    runpy.run_module("exporter", run_name="__main__", alter_sys=True)
