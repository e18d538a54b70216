"""An HTTPS client for the HTTPS tests, run as a process of its own (in a pod namespace, or in a
mount namespace of its own): Python's http.client over ssl, which is OpenSSL through SSL_write_ex
and SSL_read_ex on the socket; or, with --asyncio, asyncio's streams, where OpenSSL reads and
writes memory buffers and the event loop does the socket I/O. Every request goes on one
keep-alive connection; each line of output is a status code.

usage: tls_client.py HOST PORT [--read-after SECONDS] [--wait] [--asyncio] METHOD:PATH...

--read-after: wait so long between writing a request and reading its response (the client's
    latency then holds the wait; the server's does not).
--wait: print "ready" once ssl is loaded, and send the requests when a line arrives on stdin."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import ssl
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("requests", nargs="+")
    parser.add_argument("--read-after", type=float, default=0.0)
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--asyncio", action="store_true")
    args = parser.parse_args()
    context = ssl._create_unverified_context()
    if args.wait:
        print("ready", flush=True)
        sys.stdin.readline()
    if args.asyncio:
        asyncio.run(over_memory_buffers(args, context))
        return
    conn = http.client.HTTPSConnection(args.host, args.port, context=context, timeout=10)
    for request in args.requests:
        method, path = request.split(":", 1)
        conn.request(method, path, body=b"payload" if method in ("POST", "PUT") else None)
        time.sleep(args.read_after)
        response = conn.getresponse()
        response.read()
        print(response.status, flush=True)
    conn.close()


async def over_memory_buffers(args: argparse.Namespace, context: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection(args.host, args.port, ssl=context)
    for request in args.requests:
        method, path = request.split(":", 1)
        body = b"payload" if method in ("POST", "PUT") else b""
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {args.host}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        await asyncio.sleep(args.read_after)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        print(head.split()[1].decode(), flush=True)
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    main()
