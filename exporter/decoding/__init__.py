"""Decoding what the kernel hands over as records: HTTP/2 frames (HPACK) and DNS answers."""
