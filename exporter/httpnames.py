"""HTTP method and status labels, and the opt-in path label's templating."""

from __future__ import annotations

METHODS = {1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE", 6: "PATCH", 7: "OPTIONS",
           8: "CONNECT", 9: "TRACE"}
# status values below 100 say what happened to a request without a response (bpf/http.h)
OUTCOMES = {0: "none", 1: "pipelined", 2: "untracked"}


def method_name(code: int) -> str:
    return METHODS.get(int(code), "other")


def status_label(code: int) -> str:
    code = int(code)
    return OUTCOMES.get(code, str(code) if 100 <= code <= 599 else "other")
