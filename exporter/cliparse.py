"""What both command lines share (the exporter's, exporter/cli.py, and the live view's,
exporter/live/cli.py): exit codes, and a parser whose errors are one line."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")
