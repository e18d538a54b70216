"""Names of DNS response codes and query types, as the metrics label them."""

from __future__ import annotations

RCODES = {0: "NoError", 1: "FormErr", 2: "ServFail", 3: "NXDomain", 4: "NotImp", 5: "Refused",
          6: "YXDomain", 7: "YXRRSet", 8: "NXRRSet", 9: "NotAuth", 10: "NotZone",
          11: "DSOTYPENI"}
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
TRANSPORTS = {0: "udp", 1: "tcp"}


def rcode_name(code: int) -> str:
    return RCODES.get(int(code), f"unknown:{int(code)}")


def qtype_name(code: int) -> str:
    return QTYPES.get(int(code), "other")


def transport_name(code: int) -> str:
    return TRANSPORTS.get(int(code), "other")
