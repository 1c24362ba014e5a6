"""Non-blocking HTTP/1.1 client the sidecar uses for services with no local worker.

The seed prototype called its fallback synchronously on the sidecar's only
thread, so one slow peer stalled the whole node. Here every call is a
coroutine on the sidecar's event loop, connections are kept alive and reused
per peer, and responses are parsed by `httptools`.

A peer is another node, so its answers are input like any client's (DESIGN
§9): the response head (and a chunked body's trailers) may not exceed
`MAX_HEADER_BYTES` of bytes read without progress, because httptools
concatenates an unfinished header value itself; the body is counted as it
arrives and capped at `max_body`; informational (1xx) responses are skipped;
anything after the response ends the connection instead of being read as the
next request's answer; a call that fails or times out closes its connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from dpumesh.bridge_codec import (
    HOP_BY_HOP,
    MAX_HEADER_BYTES,
    is_field_value,
    is_target,
    is_token,
)

READ_SIZE = 65536


class FallbackError(Exception):
    """The peer could not be reached or answered with something that is not HTTP."""


@dataclass(frozen=True, slots=True)
class Peer:
    """An HTTP endpoint (another dpu-daemon's bridge or any server)."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Peer:
        """`http://host:port` (path ignored); raises ValueError for anything else."""
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// peer URL: {url!r}")
        return cls(parts.hostname, parts.port or 80)


class _Trailing(Exception):
    """A peer sent bytes after its response: stop parsing, do not reuse the connection."""


@dataclass(slots=True)
class _Response:
    """Collects one response from httptools callbacks (1xx interim responses skipped)."""

    max_body: int
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    body_len: int = 0
    complete: bool = False
    headers_done: bool = False
    keep_alive: bool = False
    progress: bool = False  # set when a feed completed the head or carried body bytes
    parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Trailing
        self.headers = []
        self.body = []
        self.body_len = 0
        self.headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # after the head: a trailer field, not forwarded
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.headers_done = True
        self.progress = True
        # Ask now: llhttp resets its state once the message is complete.
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        for name, value in self.headers:
            if name.lower() == "content-length" and _too_long(value, self.max_body):
                raise FallbackError(f"response body of {value[:20]} bytes exceeds {self.max_body}")

    def on_body(self, chunk: bytes) -> None:
        self.progress = True
        self.body_len += len(chunk)
        if self.body_len > self.max_body:
            raise FallbackError(f"response body exceeds {self.max_body} bytes")
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.progress = True
        if 100 <= self.status < 200:
            return  # interim (100 Continue, 103 Early Hints): the real answer follows
        self.complete = True


class FallbackClient:
    """Keep-alive connection pool per peer; `request` never blocks the event loop."""

    # Idle connections kept per peer: as many as a loaded node keeps in flight to another
    # (Envoy's pools are unlimited); fewer would open a connection per cross-node call.
    def __init__(self, max_idle_per_peer: int = 1024, max_body: int = 8 << 20) -> None:
        self._idle: dict[Peer, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._max_idle = max_idle_per_peer
        self._max_body = max_body

    async def request(
        self,
        peer: Peer,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request to `peer`; returns (status, headers, body).

        Raises TimeoutError when `timeout` passes first, FallbackError for anything else.
        """
        try:
            return await asyncio.wait_for(self._request(peer, method, path, headers, body), timeout)
        except TimeoutError:
            raise  # an OSError since Python 3.11, but the caller answers it with 504, not 502
        except (OSError, asyncio.IncompleteReadError, httptools.HttpParserError) as exc:
            raise FallbackError(f"{peer.host}:{peer.port}: {exc}") from None
        except FallbackError as exc:
            raise FallbackError(f"{peer.host}:{peer.port}: {exc}") from None

    async def _request(self, peer, method, path, headers, body):
        request = _render_request(method, path, headers, body, peer)
        # A pooled connection may have been closed by the peer since; retry once on a fresh one.
        for attempt in range(2):
            reader, writer, reused = await self._connect(peer)
            try:
                writer.write(request)
                result, keep = await self._read_response(reader, head_only=method == "HEAD")
            except (OSError, asyncio.IncompleteReadError, FallbackError):
                writer.close()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:  # cancelled at the deadline, or a parser error: never leak it
                writer.close()
                raise
            if keep:
                self._release(peer, reader, writer)
            else:
                writer.close()
            return result
        raise FallbackError("unreachable")

    async def _connect(self, peer: Peer):
        idle = self._idle.get(peer)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(peer.host, peer.port)
        return reader, writer, False

    def _release(self, peer: Peer, reader, writer) -> None:
        idle = self._idle.setdefault(peer, [])
        if len(idle) < self._max_idle:
            idle.append((reader, writer))
        else:
            writer.close()

    async def _read_response(self, reader: asyncio.StreamReader, head_only: bool = False):
        """Read one response; (status, headers, body) and whether the connection is reusable.

        `head_only`: the request was HEAD, so the response has no body whatever
        its Content-Length says (httptools cannot be told; stop at the head).
        """
        resp = _Response(max_body=self._max_body)
        parser = resp.parser = httptools.HttpResponseParser(resp)
        stalled = 0  # bytes read since the head completed or body bytes arrived
        trailing = False
        while not resp.complete and not (head_only and resp.headers_done):
            chunk = await reader.read(READ_SIZE)
            if not chunk:
                if resp.headers_done and not _has_length(resp.headers):
                    break  # body delimited by connection close
                raise FallbackError("peer closed the connection mid-response")
            resp.progress = False
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, FallbackError):
                    raise cause from None
                if not isinstance(cause, _Trailing):
                    raise FallbackError(f"malformed response: {exc}") from None
                trailing = True
            except httptools.HttpParserUpgrade:
                raise FallbackError("peer switched protocols") from None
            stalled = 0 if resp.progress else stalled + len(chunk)
            if stalled > MAX_HEADER_BYTES:
                raise FallbackError("response head or trailers exceed the header limit")
        keep = (resp.complete or head_only) and resp.keep_alive and not trailing
        headers = [(k, v) for k, v in resp.headers if k.lower() not in HOP_BY_HOP]
        return (resp.status, headers, b"".join(resp.body)), keep

    def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for _reader, writer in conns:
                writer.close()
        self._idle.clear()


def _too_long(length: str, limit: int) -> bool:
    """A Content-Length (llhttp has checked its digits) over `limit`: refused before the body."""
    digits = length.strip()
    return digits.isascii() and digits.isdigit() and (len(digits) > 18 or int(digits) > limit)


def _has_length(headers: list[tuple[str, str]]) -> bool:
    names = {k.lower() for k, _ in headers}
    return "content-length" in names or "transfer-encoding" in names


def _render_request(
    method: str, path: str, headers: list[tuple[str, str]], body: bytes, peer: Peer
) -> bytes:
    # Workers' egress requests reach here unchecked by any HTTP parser: never write
    # something that would change the framing of the request (or start another one).
    if not is_token(method) or not is_target(path):
        raise FallbackError(f"refusing to send request line {method[:16]!r} {path[:64]!r}")
    lines = [f"{method} {path} HTTP/1.1"]
    has_host = False
    for key, value in headers:
        lower = key.lower()
        if lower in HOP_BY_HOP:
            continue
        if not is_token(key) or not is_field_value(value):
            raise FallbackError(f"refusing to send header {key[:64]!r}")
        has_host = has_host or lower == "host"
        lines.append(f"{key}: {value}")
    if not has_host:
        lines.append(f"host: {peer.host}:{peer.port}")
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
