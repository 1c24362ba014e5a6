"""Sans-IO codec for the port-5005 bridge: bytes in, requests out; responses to bytes.

One listener speaks two protocols, told apart by the first byte a client sends
(DESIGN §2): `{` starts the seed's unframed JSON protocol, an upper-case
letter starts HTTP/1.1. HTTP is parsed by `httptools` (llhttp); JSON by the
standard library. Everything that can go wrong with client input becomes a
`BadRequest` carrying the status to answer with, so the I/O layer stays dumb.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

MAX_HEADER_BYTES = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "content-length",
        "te",
        "trailer",
        "upgrade",
    }
)
_JSON_FIELDS = frozenset(
    {"method", "path", "headers", "body", "query_string", "target_service", "url"}
)
# What may appear in an HTTP/1.1 request line and header block (RFC 9110/9112). JSON input
# is checked against these before it can be written into a request to a peer: a CR/LF
# smuggled into a path or a header would otherwise start a second request.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]*")  # visible ASCII, no spaces (percent-encode the rest)
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF, NUL or other controls


def is_token(text: str) -> bool:
    """True if `text` is an HTTP token (a method or a header name)."""
    return _TOKEN.fullmatch(text) is not None


def is_target(text: str) -> bool:
    """True if `text` can stand in a request line (path or query) as it is."""
    return _TARGET.fullmatch(text) is not None


def is_field_value(text: str) -> bool:
    """True if `text` can be sent as a header value (latin-1, no control characters)."""
    return _FIELD_VALUE.fullmatch(text) is not None


class BadRequest(Exception):
    """Client input we refuse; `status` is what the client is told before we close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class BridgeRequest:
    """One complete client request, whichever protocol carried it."""

    protocol: str  # "http" or "json"
    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True
    target_service: str | None = None
    url: str | None = None

    def header(self, name: str) -> str | None:
        """First header called `name` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


class _HttpCallbacks:
    """Receives httptools callbacks for one connection and collects requests."""

    __slots__ = (
        "begun",
        "body",
        "done",
        "header_bytes",
        "headers",
        "headers_complete",
        "keep_alive",
        "max_body",
        "method",
        "parser",
        "url",
    )

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.parser: httptools.HttpRequestParser | None = None
        self.done: list[BridgeRequest] = []
        self.begun = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.header_bytes = 0
        self.headers_complete = False
        self.method = ""
        self.keep_alive = True

    def on_message_begin(self) -> None:
        self._reset()
        self.begun = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def _count(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise BadRequest(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        self.headers_complete = True
        assert self.parser is not None
        self.method = self.parser.get_method().decode("ascii")
        self.keep_alive = self.parser.should_keep_alive()
        for name, value in self.headers:
            if name.lower() == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise BadRequest(400, "invalid Content-Length") from None
                if length > self.max_body:
                    raise BadRequest(413, f"body of {length} bytes exceeds {self.max_body}")

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)
        if sum(map(len, self.body)) > self.max_body:
            raise BadRequest(413, f"body exceeds {self.max_body} bytes")

    def on_message_complete(self) -> None:
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise BadRequest(400, "invalid request target") from None
        self.done.append(
            BridgeRequest(
                protocol="http",
                method=self.method,
                path=(parsed.path or b"/").decode("latin-1"),
                query=(parsed.query or b"").decode("latin-1"),
                headers=self.headers,
                body=b"".join(self.body),
                keep_alive=self.keep_alive,
            )
        )
        self.begun = False
        self._reset()


class BridgeParser:
    """Parses one client connection's byte stream into `BridgeRequest`s."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._protocol: str | None = None
        self._http: httptools.HttpRequestParser | None = None
        self._callbacks = _HttpCallbacks(max_body)
        self._json_buf = bytearray()
        self._json_decoder = json.JSONDecoder()

    @property
    def protocol(self) -> str | None:
        """`http`, `json`, or None before the first byte."""
        return self._protocol

    @property
    def in_progress(self) -> bool:
        """True while part of a request has arrived but not all of it."""
        if self._protocol == "json":
            return bool(self._json_buf.strip())
        return self._callbacks.begun

    def feed(self, data: bytes) -> list[BridgeRequest]:
        """Consume bytes; return the requests they completed. Raises `BadRequest`."""
        if self._protocol is None:
            stripped = data.lstrip()
            if not stripped:
                return []
            first = stripped[:1]
            if first == b"{":
                self._protocol = "json"
            elif b"A" <= first <= b"Z":
                self._protocol = "http"
                self._http = httptools.HttpRequestParser(self._callbacks)
                self._callbacks.parser = self._http
            else:
                raise BadRequest(400, "neither HTTP/1.1 nor a JSON object")
        if self._protocol == "json":
            return self._feed_json(data)
        return self._feed_http(data)

    def eof(self) -> None:
        """The client closed its side; a half-received request is an error."""
        if self.in_progress:
            raise BadRequest(400, "connection closed in the middle of a request")

    def _feed_http(self, data: bytes) -> list[BridgeRequest]:
        parser = self._http
        assert parser is not None
        try:
            parser.feed_data(data)
        except BadRequest:
            raise
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, BadRequest):
                raise cause from None
            raise BadRequest(400, f"malformed HTTP request: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise BadRequest(400, "protocol upgrades are not supported") from None
        except httptools.HttpParserError as exc:
            raise BadRequest(400, f"malformed HTTP request: {exc}") from None
        cb = self._callbacks
        out = cb.done
        cb.done = []
        return out

    def _feed_json(self, data: bytes) -> list[BridgeRequest]:
        buf = self._json_buf
        buf += data
        if len(buf) > self.max_body + MAX_HEADER_BYTES:
            raise BadRequest(413, f"JSON request exceeds {self.max_body} bytes")
        out = []
        while True:
            text_end = len(buf.rstrip())
            if text_end == 0 or buf[text_end - 1 : text_end] != b"}":
                return out
            try:
                text = bytes(buf).decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(400, "JSON request is not UTF-8") from None
            start = len(text) - len(text.lstrip())
            try:
                obj, end = self._json_decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                return out  # incomplete so far; wait for more bytes
            consumed = len(text[:end].encode("utf-8"))
            del buf[:consumed]
            out.append(_json_request(obj))


def _json_request(obj: object) -> BridgeRequest:
    """Validate one seed-protocol object into a request."""
    if not isinstance(obj, dict):
        raise BadRequest(400, "JSON request must be an object")
    unknown = set(obj) - _JSON_FIELDS
    if unknown:
        raise BadRequest(400, f"unknown JSON request fields: {sorted(unknown)}")
    method = obj.get("method", "GET")
    path = obj.get("path", "/")
    query = obj.get("query_string", "") or ""
    headers = obj.get("headers", {}) or {}
    body = obj.get("body", "")
    for name, value in (("method", method), ("path", path), ("query_string", query)):
        if not isinstance(value, str):
            raise BadRequest(400, f"JSON field {name!r} must be a string")
    if not method.isascii() or not method.isalpha():
        raise BadRequest(400, "JSON field 'method' must be an HTTP method")
    for name, value in (("path", path), ("query_string", query)):
        if not is_target(value):
            raise BadRequest(400, f"JSON field {name!r} must be visible ASCII (percent-encode)")
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise BadRequest(400, "JSON field 'headers' must map strings to strings")
    for key, value in headers.items():
        if not is_token(key) or not is_field_value(value):
            raise BadRequest(400, f"JSON header {key[:64]!r}: invalid name or value")
    if body is None:
        body = ""
    if not isinstance(body, str):
        raise BadRequest(400, "JSON field 'body' must be a string")
    extras = {}
    for name in ("target_service", "url"):
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(400, f"JSON field {name!r} must be a string")
        extras[name] = value
    if "?" in path and not query:
        path, query = path.split("?", 1)
    return BridgeRequest(
        protocol="json",
        method=method.upper(),
        path=path or "/",
        query=query,
        headers=list(headers.items()),
        body=body.encode("utf-8"),
        keep_alive=True,
        **extras,
    )


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def render_http(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    keep_alive: bool,
) -> bytes:
    """An HTTP/1.1 response with exact framing; hop-by-hop headers are replaced."""
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines.extend(f"{k}: {v}" for k, v in headers if k.lower() not in HOP_BY_HOP)
    lines.append(f"content-length: {len(body)}")
    if not keep_alive:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body


def render_json(req_id: int, status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A seed-protocol response object (the body as text, as the seed's client expects)."""
    return json.dumps(
        {
            "req_id": req_id,
            "status": status,
            "headers": {k: v for k, v in headers if k.lower() not in HOP_BY_HOP},
            "body": body.decode("utf-8", errors="replace"),
        }
    ).encode("utf-8")


def error_body(status: int, reason: str) -> bytes:
    """A small JSON error document, the same for every bridge error."""
    return json.dumps({"error": _reason(status), "status": status, "detail": reason}).encode()
