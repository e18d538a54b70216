"""A TLS context with a certificate made at start-up, for Kubernetes authentication without a
certificate to manage: scrapers send their service account token, which must not cross the
network in clear. The key never touches a file system: Python's ssl module loads certificates
only by path, so key and certificate pass through an anonymous memory file (memfd), closed
once loaded. A certificate signed by a CA of your own (cert-manager, a Secret) is given with
--web.config.file instead (docs/security.md)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# made anew at every start: a restart (or an upgrade) is the rotation
VALIDITY = datetime.timedelta(days=365)


def certificate(names: list[str], addresses: list[str]) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) for `names` and `addresses`, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            names[0] if names else "ebpf-net-exporter")])
    now = datetime.datetime.now(datetime.UTC)
    alternative: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    for text in addresses:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            continue
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))   # clocks a little off
               .not_valid_after(now + VALIDITY))
    if alternative:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_context(names: list[str], addresses: list[str]) -> ssl.SSLContext:
    """A TLS 1.2+ server context with a certificate made now."""
    cert, key = certificate(names, addresses)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    fd = os.memfd_create("ebpf-net-exporter-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, key + cert)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


def default_names() -> list[str]:
    return [socket.gethostname(), "localhost"]
