"""Not collected by the suite (its name does not start with test_): test_testnode.py runs it in
a pytest of its own, which it terminates while the node is up, to see the node torn down."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lab.testnode import TestNode


def test_holds_its_node_until_terminated(node: TestNode) -> None:
    Path(os.environ["SIGTERM_TARGET_READY"]).write_text(node.prefix)
    time.sleep(120)
