"""Sans-IO codec for the port-5005 bridge: bytes in, requests out; responses to bytes.

One listener speaks two protocols, told apart by the first byte a client sends
(DESIGN §2): `{` starts the seed's unframed JSON protocol, an upper-case
letter starts HTTP/1.1. HTTP is parsed by `httptools` (llhttp); JSON by the
standard library. Everything that can go wrong with client input becomes a
`BadRequest` carrying the status to answer with, so the I/O layer stays dumb.

Hostile input (DESIGN §9): the work per request is linear in its size and
what is held per connection is bounded.
* HTTP: httptools concatenates an unfinished header value itself, so while a
  message's head is incomplete it is never handed more than `HEAD_SLICE`
  bytes at once, a partial line is held back until its newline (or a whole
  slice) arrives, and bytes fed without progress (no head completed, no
  body byte) are counted: more than `MAX_HEADER_BYTES` of them answer 431
  (400 inside a chunked body: endless chunk extensions or trailers). So at
  most `MAX_HEADER_BYTES + 1 + HEAD_SLICE` bytes of one head ever reach
  httptools; the last `HEAD_SLICE` is the tolerance for a head that began in
  the same slice as the previous message's end.
  Whole requests read at a message boundary (the common case) go to httptools
  in one call; `http_bytes_fed` and `http_feeds` count what httptools got.
* JSON: an incremental scanner finds the end of the top-level object in
  O(new bytes) (string, escape and nesting state kept across feeds), refuses
  nesting deeper than `MAX_JSON_DEPTH` before anything recursive runs, and the
  complete object is decoded once (a whole shallow object in one read skips the
  scanner). Every malformed object is a 400: numbers (no field is one), NaN,
  duplicate keys, lone surrogates, URLs `urlsplit` cannot take, wrong types.
* The body is passed on de-framed, so `Content-Length` and `Transfer-Encoding`
  are not (a worker told `chunked` would read an empty body); a chunked body's
  trailer fields are counted against the header cap and dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

import httptools

MAX_HEADER_BYTES = 64 * 1024
# Most bytes handed to httptools in one call while a head is incomplete (see the module doc).
HEAD_SLICE = 4096
# Seed requests nest three levels at most ({"headers": {...}}); anything deeper is refused
# by the scanner, so the recursive JSON decoder never sees it.
MAX_JSON_DEPTH = 32
MAX_METHOD_CHARS = 32
MAX_URL_CHARS = 8192
MAX_SERVICE_BYTES = 63  # dpumesh.registry.MAX_SERVICE_BYTES: longer names name no worker
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
# How the client framed its body: the codec has undone that framing, so these are not
# passed on (a worker told `Transfer-Encoding: chunked` would read an empty body).
FRAMING = frozenset({"transfer-encoding", "content-length"})
_JSON_FIELDS = frozenset(
    {"method", "path", "headers", "body", "query_string", "target_service", "url"}
)
# What may appear in an HTTP/1.1 request line and header block (RFC 9110/9112). JSON input
# is checked against these before it can be written into a request to a peer: a CR/LF
# smuggled into a path or a header would otherwise start a second request.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]*")  # visible ASCII, no spaces (percent-encode the rest)
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF, NUL or other controls
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(r"[a-z0-9._~!$&'()*+,;=%:-]+")  # reg-name or IPv6, as urlsplit leaves it
# The JSON scanner's stops: outside strings the structural bytes, inside them quote and escape.
_JSON_STRUCTURE = re.compile(rb'[{}\[\]"]')
# The rest of a string up to its closing quote (or the end of what has arrived): escapes
# are consumed as pairs, possessively, so one call covers the whole string in linear time.
_JSON_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_JSON_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)


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
        "body_len",
        "content_length",
        "done",
        "framed",
        "header_bytes",
        "headers",
        "headers_complete",
        "keep_alive",
        "max_body",
        "method",
        "parser",
        "progress",
        "url",
    )

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.parser: httptools.HttpRequestParser | None = None
        self.done: list[BridgeRequest] = []
        self.begun = False
        self.progress = False  # set by any callback that moved a message forward
        self._reset()

    def _reset(self) -> None:
        self.url: list[bytes] = []
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.body_len = 0  # running count: summing the chunks per chunk was quadratic
        self.content_length: int | None = None
        self.framed = False  # a Content-Length or Transfer-Encoding header came
        self.header_bytes = 0
        self.headers_complete = False
        self.method = ""
        self.keep_alive = True

    def on_message_begin(self) -> None:
        self._reset()
        self.begun = True

    def on_url(self, url: bytes) -> None:
        self.url.append(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if self.headers_complete:
            return  # a chunked body's trailer field: counted, not forwarded as a header
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def _count(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise BadRequest(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        self.headers_complete = True
        self.progress = True
        assert self.parser is not None
        if self.parser.get_http_version() not in ("1.1", "1.0"):
            # llhttp takes `GET /x\r\n` (no version) for HTTP/0.9 and reads headers after
            # it; a front proxy would see a different request there. Only 1.x is spoken.
            raise BadRequest(400, "request line without HTTP/1.1 or HTTP/1.0")
        self.method = self.parser.get_method().decode("ascii")
        self.keep_alive = self.parser.should_keep_alive()
        for name, value in self.headers:
            lname = name.lower()
            if lname not in FRAMING:
                continue
            self.framed = True
            if lname == "content-length":
                # llhttp has checked the digits and refused duplicates or an overflow.
                try:
                    length = int(value)
                except ValueError:
                    raise BadRequest(400, "invalid Content-Length") from None
                if length > self.max_body:
                    raise BadRequest(413, f"body of {length} bytes exceeds {self.max_body}")
                self.content_length = length

    def on_body(self, chunk: bytes) -> None:
        self.progress = True
        self.body.append(chunk)
        self.body_len += len(chunk)
        if self.body_len > self.max_body:
            raise BadRequest(413, f"body exceeds {self.max_body} bytes")

    def on_message_complete(self) -> None:
        self.progress = True
        try:
            parsed = httptools.parse_url(b"".join(self.url))
        except httptools.HttpParserInvalidURLError:
            raise BadRequest(400, "invalid request target") from None
        self.done.append(
            BridgeRequest(
                protocol="http",
                method=self.method,
                path=(parsed.path or b"/").decode("latin-1"),
                query=(parsed.query or b"").decode("latin-1"),
                headers=[(k, v) for k, v in self.headers if k.lower() not in FRAMING]
                if self.framed
                else self.headers,
                body=b"".join(self.body),
                keep_alive=self.keep_alive,
            )
        )
        self.begun = False
        self._reset()


class _JsonScanner:
    """Finds complete top-level JSON objects in a byte stream in O(new bytes).

    Keeps the string, escape and nesting state of the unfinished object across
    feeds and resumes where the last feed stopped, so a large object arriving in
    many pieces is scanned once. Refuses nesting deeper than `MAX_JSON_DEPTH` and
    objects larger than `limit` while they arrive.
    """

    __slots__ = ("buf", "depth", "escape", "in_string", "limit", "scan", "start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()  # from the unfinished object's first byte (or whitespace)
        self.scan = 0  # where scanning resumes
        self.start = 0  # the unfinished object's `{`
        self.depth = 0
        self.in_string = False
        self.escape = False  # the last byte scanned was a backslash inside a string

    def feed(self, data: bytes) -> list[bytes]:
        """Append `data`; return the bytes of every top-level object it completed."""
        buf = self.buf
        buf += data
        pos = self.scan
        out: list[bytes] = []
        while pos < len(buf):
            if self.depth == 0:  # between objects: only whitespace, then `{`
                m = _JSON_NON_SPACE.search(buf, pos)
                if m is None:
                    buf.clear()
                    pos = 0
                    break
                if buf[m.start()] != 0x7B:  # {
                    raise BadRequest(400, "JSON request must be an object")
                self.start = m.start()
                self.depth = 1
                pos = m.start() + 1
            elif self.in_string:
                if self.escape:  # the last feed ended in a backslash: skip the escaped byte
                    self.escape = False
                    pos += 1
                    continue
                end = _JSON_STRING_REST.match(buf, pos).end()  # type: ignore[union-attr]
                if end == len(buf):
                    pos = end
                elif buf[end] == 0x22:  # the closing quote
                    self.in_string = False
                    pos = end + 1
                else:  # a backslash as the last byte: its pair is still to come
                    self.escape = True
                    pos = end + 1
            else:
                m = _JSON_STRUCTURE.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                i = m.start()
                byte = buf[i]
                pos = i + 1
                if byte == 0x22:  # "
                    self.in_string = True
                elif byte in (0x7B, 0x5B):  # { [
                    self.depth += 1
                    if self.depth > MAX_JSON_DEPTH:
                        raise BadRequest(400, f"JSON nested deeper than {MAX_JSON_DEPTH}")
                else:  # } ]  (a mismatched pair is left to the decoder to refuse)
                    self.depth -= 1
                    if self.depth == 0:
                        self._check_size(pos - self.start)
                        out.append(bytes(buf[self.start : pos]))
                        del buf[:pos]
                        pos = 0
        self.scan = pos
        if self.depth:
            self._check_size(len(buf) - self.start)
        return out

    def _check_size(self, size: int) -> None:
        if size > self.limit:
            raise BadRequest(413, f"JSON request exceeds {self.limit} bytes")


class BridgeParser:
    """Parses one client connection's byte stream into `BridgeRequest`s."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._protocol: str | None = None
        self._http: httptools.HttpRequestParser | None = None
        self._callbacks = _HttpCallbacks(max_body)
        self._held = bytearray()  # HTTP bytes not yet handed to httptools (a partial line)
        self._stalled = 0  # HTTP bytes fed since the last progress of a message
        self._leading = 0  # whitespace before the first byte that tells the protocol
        self._json = _JsonScanner(max_body + MAX_HEADER_BYTES)
        self.http_bytes_fed = 0  # bytes handed to httptools (diagnostics, tests)
        self.http_feeds = 0  # calls of httptools' feed_data

    @property
    def protocol(self) -> str | None:
        """`http`, `json`, or None before the first byte."""
        return self._protocol

    @property
    def in_progress(self) -> bool:
        """True while part of a request has arrived but not all of it."""
        if self._protocol == "json":
            return self._json.depth > 0
        return self._callbacks.begun or bool(self._held.strip(b"\r\n"))

    def feed(self, data: bytes) -> list[BridgeRequest]:
        """Consume bytes; return the requests they completed. Raises `BadRequest`."""
        if self._protocol is None:
            stripped = data.lstrip()
            if not stripped:
                self._leading += len(data)
                if self._leading > MAX_HEADER_BYTES:
                    raise BadRequest(400, "only whitespace, neither HTTP/1.1 nor JSON")
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
            scanner = self._json
            if scanner.depth == 0 and not scanner.buf and len(data) <= scanner.limit:
                quick = _one_shallow_object(data)
                if quick is not None:
                    return [quick]
            return [_decode_json(raw) for raw in scanner.feed(data)]
        return self._feed_http(data)

    def eof(self) -> None:
        """The client closed its side; a half-received request is an error."""
        if self.in_progress:
            raise BadRequest(400, "connection closed in the middle of a request")

    def _feed_http(self, data: bytes) -> list[BridgeRequest]:
        cb = self._callbacks
        held = self._held
        if not held and not cb.begun and not self._stalled and len(data) <= HEAD_SLICE:
            # The common case: whole requests in one read, starting at a message boundary.
            # One slice, counted like any other, so the bounds above still hold.
            self._feed_slice(data)
            out = cb.done
            cb.done = []
            return out
        buf: bytes | bytearray
        if held:
            held += data
            buf = held
        else:
            buf = data
        pos, end = 0, len(buf)
        try:
            with memoryview(buf) as view:
                while pos < end:
                    n = self._next_slice(buf, pos, end)
                    if n == 0:
                        break
                    self._feed_slice(view[pos : pos + n])
                    pos += n
        except BadRequest:
            self._held = bytearray()  # the connection is refused: keep nothing of it
            raise
        if buf is held:
            del held[:pos]
        else:
            held += buf[pos:]
        out = cb.done
        cb.done = []
        return out

    def _next_slice(self, buf: bytes | bytearray, pos: int, end: int) -> int:
        """How many of the bytes at `pos` httptools may have now (0: hold them back)."""
        cb = self._callbacks
        avail = end - pos
        if cb.headers_complete and cb.content_length is not None:
            left = cb.content_length - cb.body_len
            if left > 0:  # exactly the rest of the body: never a byte of the next head
                return min(avail, left)
        n = min(avail, HEAD_SLICE, MAX_HEADER_BYTES + 1 - self._stalled)
        if n < avail or n == HEAD_SLICE or cb.headers_complete:
            return n
        # The tail of what has arrived, inside a head: hand over complete lines only, so
        # a header value dribbled in byte by byte is not concatenated once per byte.
        newline = buf.rfind(b"\n", pos, end)
        return 0 if newline < 0 else newline + 1 - pos

    def _feed_slice(self, chunk: memoryview) -> None:
        parser = self._http
        assert parser is not None
        cb = self._callbacks
        cb.progress = False
        self.http_bytes_fed += len(chunk)
        self.http_feeds += 1
        try:
            parser.feed_data(chunk)
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
        if cb.progress:
            self._stalled = 0
            return
        self._stalled += len(chunk)
        if self._stalled > MAX_HEADER_BYTES:
            if cb.headers_complete:
                raise BadRequest(400, "chunk extensions or trailer fields too large")
            raise BadRequest(431, "request header fields too large")


class _JsonNumber:
    """What every JSON number or NaN/Infinity decodes to: no seed field is a number.

    Never converted, so a 5,000-digit integer costs nothing and fails the field's
    type check like any other wrong type.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<number>"


_NUMBER = _JsonNumber()


def _number(_text: str) -> _JsonNumber:
    return _NUMBER


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise BadRequest(400, "duplicate key in a JSON object")
    return obj


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_int=_number,
    parse_float=_number,
    parse_constant=_number,
)


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "JSON request is not UTF-8") from None


def _decode_json(raw: bytes) -> BridgeRequest:
    """Decode one complete, depth-checked object; every failure is a 400."""
    try:
        obj = _DECODER.decode(_utf8(raw))
    except ValueError as exc:  # JSONDecodeError included
        raise BadRequest(400, f"malformed JSON: {str(exc)[:200]}") from None
    return _json_request(obj)


def _one_shallow_object(data: bytes) -> BridgeRequest | None:
    """The request, when `data` is exactly one object nested too little to need the scanner.

    The common case (a whole request in one read) then costs a few passes in C
    instead of the byte-wise scan: with strings removed and at most `MAX_JSON_DEPTH`
    brackets in all, the nesting cannot be deeper than that, so decoding is safe.
    None: leave it to the scanner (more than one object, an unfinished one, or deep).
    """
    text = data.strip()
    if text[:1] != b"{" or text[-1:] != b"}":
        return None
    rest = _JSON_STRING.sub(b"", text)
    if b'"' in rest:
        return None  # an unterminated string
    opens = rest.count(b"{") + rest.count(b"[")
    if opens > MAX_JSON_DEPTH or opens != rest.count(b"}") + rest.count(b"]"):
        return None
    decoded = _utf8(text)
    try:
        obj, end = _DECODER.raw_decode(decoded)
    except ValueError as exc:
        raise BadRequest(400, f"malformed JSON: {str(exc)[:200]}") from None
    if end != len(decoded):
        return None  # pipelined objects: the scanner splits them
    return _json_request(obj)


def _string(obj: dict, name: str, default: str) -> str:
    """Field `name` as a string; null or absent gives `default`."""
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(400, f"JSON field {name!r} must be a string")
    return value


def _check_url(url: str) -> None:
    """An http:// URL that `routing.egress_target` parses without raising, or a 400."""
    if len(url) > MAX_URL_CHARS or not is_target(url):
        raise BadRequest(400, "JSON field 'url' must be visible ASCII (percent-encode)")
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
        hostname = parts.hostname  # lower case, without port or IPv6 brackets
    except ValueError as exc:
        raise BadRequest(400, f"JSON field 'url' is not a URL: {exc}") from None
    if parts.scheme != "http":
        raise BadRequest(400, "JSON field 'url' must be an http:// URL")
    if not hostname or not _HOSTNAME.fullmatch(hostname):
        raise BadRequest(400, "JSON field 'url' names no valid host")


def _json_request(obj: object) -> BridgeRequest:
    """Validate one seed-protocol object into a request."""
    if not isinstance(obj, dict):
        raise BadRequest(400, "JSON request must be an object")
    unknown = set(obj) - _JSON_FIELDS
    if unknown:
        raise BadRequest(400, f"unknown JSON request fields: {sorted(unknown)[:8]}"[:300])
    method = _string(obj, "method", "GET")
    path = _string(obj, "path", "/") or "/"
    query = _string(obj, "query_string", "")
    body = _string(obj, "body", "")
    headers = obj.get("headers")
    if headers is None:
        headers = {}
    if not method.isascii() or not method.isalpha() or len(method) > MAX_METHOD_CHARS:
        raise BadRequest(400, "JSON field 'method' must be an HTTP method")
    for name, value in (("path", path), ("query_string", query)):
        if not is_target(value):
            raise BadRequest(400, f"JSON field {name!r} must be visible ASCII (percent-encode)")
    if not path.startswith("/"):
        raise BadRequest(400, "JSON field 'path' must start with '/'")
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise BadRequest(400, "JSON field 'headers' must map strings to strings")
    for key, value in headers.items():
        if not is_token(key) or not is_field_value(value):
            raise BadRequest(400, f"JSON header {key[:64]!r}: invalid name or value")
    try:
        body_bytes = body.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(400, "JSON field 'body' is not encodable (lone surrogate)") from None
    target_service = _string(obj, "target_service", "") or None
    if target_service is not None:
        try:
            size = len(target_service.encode("utf-8"))
        except UnicodeEncodeError:
            size = MAX_SERVICE_BYTES + 1
        if size > MAX_SERVICE_BYTES or _CONTROL.search(target_service):
            raise BadRequest(
                400, f"JSON field 'target_service' must be 1-{MAX_SERVICE_BYTES} bytes of text"
            )
    url = _string(obj, "url", "") or None
    if url is not None:
        _check_url(url)
    if "?" in path and not query:
        path, query = path.split("?", 1)
    return BridgeRequest(
        protocol="json",
        method=method.upper(),
        path=path,
        query=query,
        headers=[(k, v) for k, v in headers.items() if k.lower() not in FRAMING],
        body=body_bytes,
        keep_alive=True,
        target_service=target_service,
        url=url,
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
