"""A tiny counting server for the load-generator tests (not a test module).

``python tests/loadgen_server.py`` binds 127.0.0.1 on a kernel-chosen port,
prints ``PORT <n>`` and serves, on the same port (told apart by the first
byte, like the DPUmesh bridge):

* HTTP/1.1 with keep-alive: any request answers ``200 ok``; a path starting
  with ``/fail`` answers 500; ``GET /_stats`` answers the counters (not counted).
* The seed's JSON protocol: one JSON object in, ``{"req_id", "status",
  "headers", "body"}`` out (status 500 for a ``/fail`` path).

Counters: requests per protocol, distinct ``x-request-id`` values and
duplicates. TCP_NODELAY is set on every accepted connection. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys

STATS = {"http": 0, "json": 0, "ids": 0, "dup_ids": 0, "no_id": 0}
_seen: set[str] = set()


def _count(proto: str, request_id: str | None) -> None:
    STATS[proto] += 1
    if request_id is None:
        STATS["no_id"] += 1
    elif request_id in _seen:
        STATS["dup_ids"] += 1
    else:
        _seen.add(request_id)
        STATS["ids"] += 1


def _http_response(status: int, body: bytes, ctype: str = "text/plain") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _take_http(buf: bytearray) -> tuple[bytes, bool] | None:
    """Answer one complete HTTP request at the start of `buf` (consumed), or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if len(buf) < end + 4 + length:
        return None
    del buf[: end + 4 + length]
    parts = lines[0].split(" ")
    path = parts[1] if len(parts) > 1 else "/"
    keep_alive = headers.get("connection", "").lower() != "close"
    if path == "/_stats":
        return _http_response(200, json.dumps(STATS).encode(), "application/json"), keep_alive
    _count("http", headers.get("x-request-id"))
    if path.startswith("/fail"):
        return _http_response(500, b"failed on purpose"), keep_alive
    return _http_response(200, b"ok"), keep_alive


def _take_json(buf: bytearray) -> bytes | None:
    """Answer one complete JSON request at the start of `buf` (consumed), or None."""
    if not buf.rstrip().endswith(b"}"):
        return None
    try:
        text = buf.decode("utf-8")
        obj, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    del buf[: len(text[:end].encode("utf-8"))]
    headers = obj.get("headers") or {}
    _count("json", headers.get("x-request-id"))
    status = 500 if str(obj.get("path", "/")).startswith("/fail") else 200
    reply = {"req_id": STATS["json"], "status": status, "headers": {}, "body": "ok"}
    return json.dumps(reply).encode("utf-8")


async def _serve_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    proto: str | None = None
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            buf += chunk
            if proto is None:
                stripped = buf.lstrip()
                if not stripped:
                    continue
                proto = "json" if stripped[:1] == b"{" else "http"
            while True:
                if proto == "http":
                    answer = _take_http(buf)
                    if answer is None:
                        break
                    writer.write(answer[0])
                    if not answer[1]:
                        await writer.drain()
                        return
                else:
                    reply = _take_json(buf)
                    if reply is None:
                        break
                    writer.write(reply)
            await writer.drain()
    except (ConnectionError, OSError):
        return
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(_serve_conn, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
