"""Seeded hostile inputs for the port-5005 bridge, and the rules their answers must follow.

Shared by `tests/test_bridge_hostile.py` (a CI-sized run) and
`python -m harness.run.fuzz_bridge` (a long one), so both send the same kinds
of input and judge the answers the same way. `Generator(seed)` yields
`FuzzInput`s: valid requests, mutations of them (bit flips, truncation,
duplicated header lines, huge or negative Content-Length, bad chunk sizes,
framing conflicts, over-long heads), mutated seed-JSON objects (depth,
numbers, lone surrogates, bad URLs, wrong types, duplicate keys) and random
bytes. `send` delivers one input on its own connection, half-closes and
reads until the bridge closes; `violation` says what, if anything, the
answer did wrong.

What the protocol requires (from `dpumesh.bridge_codec` and the bridge's
connection handling, DESIGN §2, §9):
* The client sends the input and shuts down its sending side. The bridge
  answers every complete request, answers a refused or half-sent request
  once with a 4xx, then closes: so every input ends in a close, and never in
  a hang (no read may time out).
* Input that starts no request (empty, or only whitespace, up to
  `MAX_HEADER_BYTES`) gets no answer, only the close. Anything else gets at
  least one answer: a first non-space byte that is neither `{` nor A-Z is
  answered 400 in HTTP.
* The answers are in the protocol the first byte chose: HTTP responses, or
  seed-JSON objects each with a `status`.
* `valid` inputs get one 2xx per request. `invalid` inputs (broken by
  construction) end with a 400, 413 or 431 (earlier answers may belong to a
  complete request before the broken part). `unknown` inputs (random
  mutations) may get any status, but a 2xx only for a request that an
  independent parser (h11 for HTTP, the standard library's strict JSON for
  the seed protocol) also finds complete and well-formed.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import h11
import httptools

from dpumesh.bridge_codec import HEAD_SLICE, MAX_HEADER_BYTES

REFUSALS = (400, 413, 431)
JSON_FIELDS = frozenset(
    {"method", "path", "headers", "body", "query_string", "target_service", "url"}
)
WHITESPACE = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class FuzzInput:
    """One input for one connection, with what its answers must be."""

    data: bytes
    kind: str  # the mutation that made it (for reports)
    expect: str  # "valid", "invalid", "unknown" or "silent" (see the module doc)
    requests: int = 1  # complete requests in a `valid` input


@dataclass(slots=True)
class Outcome:
    """What came back on one connection."""

    statuses: list[int] = field(default_factory=list)
    protocol: str | None = None  # "http" or "json" for the answers, None if none
    closed: bool = False  # the bridge closed (EOF or reset) before the client timeout
    garbled: str | None = None  # why the answer bytes could not be read
    elapsed_s: float = 0.0

    @property
    def klass(self) -> str:
        """`close` (no answer), `hung`, `garbled`, or the last answer's class (`4xx`)."""
        if self.garbled:
            return "garbled"
        if not self.closed:
            return "hung"
        if not self.statuses:
            return "close"
        return f"{self.statuses[-1] // 100}xx"


# ---- the generator -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Targets:
    """Where valid requests go: a service behind the bridge and two of its routes.

    `post_headers` are header lines every valid POST carries (e.g. μBench's
    `request-type: iot`, so that a body is not read as a trace).
    """

    service: str = "s1"
    get_path: str = "/api/v1"
    post_path: str = "/echo"
    post_headers: tuple[tuple[str, str], ...] = ()

    def get_line(self) -> bytes:
        return f"GET /{self.service}{self.get_path}".encode()

    def post_head(self) -> bytes:
        """`POST <target> HTTP/1.1` and the POST's own header lines, CRLF-terminated."""
        lines = [f"POST /{self.service}{self.post_path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in self.post_headers]
        return ("\r\n".join(lines) + "\r\n").encode()


SEED_APP = Targets()  # tests/apps/seed_app.py as s1: /api/v1 answers, /echo echoes
MUBENCH_CELL = Targets(post_path="/api/v1", post_headers=(("request-type", "iot"),))


def templates(t: Targets) -> tuple[list[bytes], list[dict]]:
    """Valid HTTP requests and seed-JSON objects for the service `t` describes."""
    body = b'hello {} [] "quoted" \\ end'
    http = [
        t.get_line() + b"?x=1 HTTP/1.1\r\nHost: bridge\r\nX-Request-Id: r1\r\n\r\n",
        t.post_head()
        + b"Host: bridge\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body,
        t.post_head()
        + b"Host: bridge\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n",
        b"GET %s HTTP/1.1\r\nHost: %s.default.svc.cluster.local\r\n\r\n"
        % (t.get_path.encode(), t.service.encode()),
    ]
    json_objects = [
        {
            "method": "GET",
            "path": t.get_path,
            "headers": {"X-Request-Id": "r2"},
            "body": "",
            "query_string": "",
            "target_service": t.service,
        },
        {
            "method": "POST",
            "path": t.post_path,
            "headers": {"Content-Type": "text/plain", **dict(t.post_headers)},
            "body": 'json body {"nested": [1, 2]} \\ \u00e9\u4e2d',
            "url": f"http://{t.service}{t.post_path}",
        },
    ]
    return http, json_objects


_BAD_URLS = (
    "http://[::1",
    "http://[::1/x",
    "http://s1:99999/x",
    "http://s1:-1/",
    "http://s1:port/",
    "http:///x",
    "http://:80/",
    "ftp://s1/x",
    "http://s 1/",
    "http://s1/\u00e9",
    "\ud800",
)
_WRONG_VALUES = (1, -1.5, True, None, [], ["a"], {"a": 1}, 10**30)


class Generator:
    """Seeded source of `FuzzInput`s (`random.Random(seed)`: the same seed, the same inputs)."""

    def __init__(self, seed: int, targets: Targets = SEED_APP, max_body: int = 8 << 20) -> None:
        self.rng = random.Random(seed)
        self.targets = targets
        self.http, self.json = templates(targets)
        self.max_body = max_body
        self._get = targets.get_line()
        self._post = targets.post_head()
        self._makers: list[tuple[int, Callable[[], FuzzInput]]] = [
            (6, self.valid_http),
            (2, self.pipelined_http),
            (2, self.leading_blank_lines),
            (3, self.duplicated_header),
            (10, self.bit_flips),
            (4, self.byte_edits),
            (8, self.truncated),
            (4, self.content_length),
            (4, self.chunk_size),
            (4, self.broken_framing),
            (1, self.long_head),
            (1, self.many_headers),
            (5, self.random_bytes),
            (1, self.whitespace),
            (4, self.valid_json),
            (1, self.pipelined_json),
            (3, self.json_deep),
            (3, self.json_numbers),
            (3, self.json_surrogate),
            (3, self.json_bad_url),
            (4, self.json_wrong_type),
            (2, self.json_duplicate_key),
            (2, self.json_unknown_field),
            (4, self.json_truncated),
            (6, self.json_bit_flips),
            (2, self.json_garbage_after),
            (2, self.json_bad_bytes),
        ]
        self._weights = [w for w, _ in self._makers]

    def __iter__(self) -> Iterator[FuzzInput]:
        while True:
            yield self.next()

    def next(self) -> FuzzInput:
        """One more input."""
        (_, make) = self.rng.choices(self._makers, self._weights)[0]
        return make()

    def batch(self, n: int) -> list[FuzzInput]:
        """The next `n` inputs."""
        return [self.next() for _ in range(n)]

    # -- HTTP ---------------------------------------------------------------------------

    def _template(self) -> bytes:
        return self.rng.choice(self.http)

    def valid_http(self) -> FuzzInput:
        return FuzzInput(self._template(), "valid", "valid")

    def pipelined_http(self) -> FuzzInput:
        n = self.rng.randint(2, 4)
        return FuzzInput(b"".join(self._template() for _ in range(n)), "pipelined", "valid", n)

    def leading_blank_lines(self) -> FuzzInput:
        blank = b"\r\n" * self.rng.randint(1, 50)
        return FuzzInput(blank + self._template(), "leading-blank-lines", "valid")

    def duplicated_header(self) -> FuzzInput:
        raw = self._template()
        head, sep, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        i = self.rng.randrange(1, len(lines))
        lines.insert(i, lines[i])
        name = lines[i].partition(b":")[0].strip().lower()
        framing = name in (b"content-length", b"transfer-encoding")
        app_reads = name in {k.lower().encode() for k, _ in self.targets.post_headers}
        # Repeating a framing header is refused by llhttp, allowed by RFC 9112 for equal
        # Content-Length values: either answer is right. A header the app reads becomes
        # `v,v` to it: its answer, not the bridge's. Any other header may repeat.
        return FuzzInput(
            b"\r\n".join(lines) + sep + body,
            "duplicated-header",
            "unknown" if framing or app_reads else "valid",
        )

    def bit_flips(self) -> FuzzInput:
        raw = bytearray(self._template())
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randrange(len(raw))
            raw[i] ^= 1 << self.rng.randrange(8)
        return FuzzInput(bytes(raw), "bit-flips", _unknown_or_silent(bytes(raw)))

    def byte_edits(self) -> FuzzInput:
        raw = bytearray(self._template())
        for _ in range(self.rng.randint(1, 3)):
            i = self.rng.randrange(len(raw))
            if self.rng.random() < 0.5:
                del raw[i]
            else:
                raw.insert(i, self.rng.choice(b"\x00\r\n :;\t\x7f\xff{}Ab"))
        return FuzzInput(bytes(raw), "byte-edits", _unknown_or_silent(bytes(raw)))

    def truncated(self) -> FuzzInput:
        raw = self._template()
        cut = self.rng.randrange(1, len(raw))
        return FuzzInput(raw[:cut], "truncated", "invalid")

    def content_length(self) -> FuzzInput:
        choice = self.rng.randrange(5)
        if choice == 0:
            value, expect = str(self.max_body + self.rng.randint(1, 10**6)), "invalid"
        elif choice == 1:
            value, expect = "9" * self.rng.randint(20, 200), "invalid"  # overflows 64 bits
        elif choice == 2:
            value, expect = f"-{self.rng.randint(1, 10**6)}", "invalid"
        elif choice == 3:
            value, expect = self.rng.choice(["0x10", "1e3", "", "1 2", "+5", "abc"]), "invalid"
        else:
            value, expect = str(self.rng.randint(100, 1000)), "invalid"  # more than is sent
        raw = (
            self._post
            + b"Host: bridge\r\nContent-Length: "
            + value.encode()
            + b"\r\n\r\nshort body"
        )
        return FuzzInput(raw, "content-length", expect)

    def chunk_size(self) -> FuzzInput:
        size = self.rng.choice(
            [b"zz", b"-1", b"f" * 20, b"1 2", b"", b"0x5", b"fffffff", b"\xff", b"5;" + b"e" * 10]
        )
        raw = (
            self._post
            + b"Host: bridge\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size
            + b"\r\nhello\r\n0\r\n\r\n"
        )
        # `5;eeee…` is a valid size with an extension: its 5 bytes are `hello`.
        return FuzzInput(raw, "chunk-size", "valid" if size.startswith(b"5;") else "invalid")

    def broken_framing(self) -> FuzzInput:
        get, post = self._get, self._post
        raw = self.rng.choice(
            [
                post + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n",
                get + b" HTTP/1.1\r\nX-No-Colon\r\n\r\n",
                get + b" HTTP/1.1\r\nBad Name: v\r\n\r\n",
                get + b"\x00x HTTP/1.1\r\n\r\n",
                get + b" HTTP/1.1\r\nX: a\x01b\r\n\r\n",
                get + b" HTTP/1.x\r\n\r\n",
                get + b"\r\nHost: bridge\r\n\r\n",  # no version: HTTP/0.9 is not spoken
                get.lower() + b" HTTP/1.1\r\n\r\n",
                get + b" HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                b"CONNECT s1:80 HTTP/1.1\r\nHost: s1:80\r\n\r\n",
            ]
        )
        return FuzzInput(raw, "broken-framing", "invalid")

    def long_head(self) -> FuzzInput:
        size = self.rng.randint(MAX_HEADER_BYTES - 8192, MAX_HEADER_BYTES + 2 * HEAD_SLICE + 8192)
        prefix = self._get + b" HTTP/1.1\r\nX-Long: "
        raw = prefix + b"v" * (size - len(prefix) - 4) + b"\r\n\r\n"
        if len(raw) <= MAX_HEADER_BYTES - 1024:
            expect = "valid"
        elif len(raw) > MAX_HEADER_BYTES + 1 + HEAD_SLICE:
            expect = "invalid"
        else:
            expect = "unknown"  # within the documented tolerance
        if self.rng.random() < 0.3:  # never finished
            raw = raw[: -self.rng.randint(5, 100)]
            expect = "invalid"
        return FuzzInput(raw, "long-head", expect)

    def many_headers(self) -> FuzzInput:
        n = self.rng.randint(100, 3000)
        lines = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(n))
        raw = self._get + b" HTTP/1.1\r\n" + lines + b"\r\n"
        return FuzzInput(raw, "many-headers", "valid" if len(raw) < MAX_HEADER_BYTES else "unknown")

    def random_bytes(self) -> FuzzInput:
        raw = self.rng.randbytes(self.rng.randint(0, 300))
        return FuzzInput(raw, "random-bytes", _unknown_or_silent(raw))

    def whitespace(self) -> FuzzInput:
        raw = bytes(self.rng.choice(WHITESPACE) for _ in range(self.rng.randint(0, 2000)))
        return FuzzInput(raw, "whitespace", "silent")

    # -- seed JSON ------------------------------------------------------------------------

    def _object(self) -> dict:
        return dict(self.rng.choice(self.json))

    def valid_json(self) -> FuzzInput:
        return FuzzInput(json.dumps(self._object()).encode(), "json-valid", "valid")

    def pipelined_json(self) -> FuzzInput:
        n = self.rng.randint(2, 3)
        raw = b"\n".join(json.dumps(self._object()).encode() for _ in range(n))
        return FuzzInput(raw, "json-pipelined", "valid", n)

    def json_deep(self) -> FuzzInput:
        depth = self.rng.choice([33, 100, 1000, 20_000])
        opener, closer = self.rng.choice([(b'{"a":', b"}"), (b"[", b"]")])
        raw = b'{"body": ' + opener * depth + b"1" + closer * depth + b"}"
        return FuzzInput(raw, "json-deep", "invalid")

    def json_numbers(self) -> FuzzInput:
        value = self.rng.choice(["1" * 5000, "NaN", "Infinity", "-Infinity", "1e999", "0", "-0.5"])
        key = self.rng.choice(sorted(JSON_FIELDS))
        return FuzzInput(f'{{"{key}": {value}}}'.encode(), "json-numbers", "invalid")

    def json_surrogate(self) -> FuzzInput:
        obj = self._object()
        key = self.rng.choice(["body", "path", "target_service", "headers"])
        obj[key] = {"X": "@LONE@"} if key == "headers" else "@LONE@"
        lone = self.rng.choice(["\\ud800", "\\udfff", "\\udbff\\u0041"])
        text = json.dumps(obj).replace("@LONE@", "a" + lone)
        return FuzzInput(text.encode(), "json-surrogate", "invalid")

    def json_bad_url(self) -> FuzzInput:
        obj = self._object()
        obj["url"] = self.rng.choice(_BAD_URLS)
        return FuzzInput(json.dumps(obj).encode(), "json-bad-url", "invalid")

    def json_wrong_type(self) -> FuzzInput:
        obj = self._object()
        key = self.rng.choice(sorted(JSON_FIELDS))
        value = self.rng.choice(_WRONG_VALUES)
        if value is None or (key == "headers" and isinstance(value, dict) and not value):
            value = 7  # null means "absent" for every field; {} is valid headers
        obj[key] = value
        return FuzzInput(json.dumps(obj).encode(), "json-wrong-type", "invalid")

    def json_duplicate_key(self) -> FuzzInput:
        obj = self._object()
        key = self.rng.choice(["method", "path", "body"])
        obj[key] = {"method": "GET", "path": "/api/v1", "body": ""}[key]
        text = f'{{"{key}": {json.dumps(obj[key])}, ' + json.dumps(obj)[1:]
        return FuzzInput(text.encode(), "json-duplicate-key", "invalid")

    def json_unknown_field(self) -> FuzzInput:
        obj = self._object()
        obj[self.rng.choice(["Method", "status", "req_id", "x", ""])] = "v"
        return FuzzInput(json.dumps(obj).encode(), "json-unknown-field", "invalid")

    def json_truncated(self) -> FuzzInput:
        raw = json.dumps(self._object()).encode()
        return FuzzInput(raw[: self.rng.randrange(1, len(raw))], "json-truncated", "invalid")

    def json_bit_flips(self) -> FuzzInput:
        raw = bytearray(json.dumps(self._object(), ensure_ascii=self.rng.random() < 0.5).encode())
        for _ in range(self.rng.randint(1, 3)):
            i = self.rng.randrange(1, len(raw))  # keep the `{`: flips of it are random bytes
            raw[i] ^= 1 << self.rng.randrange(8)
        return FuzzInput(bytes(raw), "json-bit-flips", "unknown")

    def json_garbage_after(self) -> FuzzInput:
        raw = json.dumps(self._object()).encode() + self.rng.choice([b"x", b"]", b"[1]", b"1"])
        return FuzzInput(raw, "json-garbage-after", "invalid")

    def json_bad_bytes(self) -> FuzzInput:
        bad = self.rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x01", b"\t", b"\n"])
        return FuzzInput(b'{"body": "a' + bad + b'b"}', "json-bad-bytes", "invalid")


def _unknown_or_silent(raw: bytes) -> str:
    stripped = raw.lstrip()
    if not stripped:
        return "silent"
    return "unknown"


# ---- sending and judging ---------------------------------------------------------------


def send(port: int, data: bytes, timeout_s: float = 3.0, host: str = "127.0.0.1") -> Outcome:
    """Send `data` on a new connection, half-close, read until the bridge closes."""
    out = Outcome()
    began = time.monotonic()
    deadline = began + timeout_s
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if data:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused and closed while we were still sending: read what came back
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                out.closed = True
                break
            if not chunk:
                out.closed = True
                break
            chunks.append(chunk)
    out.elapsed_s = time.monotonic() - began
    read_answers(b"".join(chunks), out)
    return out


class _Responses:
    """httptools callbacks that record the status of each response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.statuses: list[int] = []

    def on_message_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())


def read_answers(raw: bytes, out: Outcome) -> None:
    """Fill `out` with the statuses of the answers in `raw` (or why they do not parse)."""
    if not raw:
        return
    if raw.startswith(b"HTTP/"):
        out.protocol = "http"
        responses = _Responses()
        try:
            responses.parser.feed_data(raw)
        except httptools.HttpParserError as exc:
            out.garbled = f"HTTP answer does not parse: {exc}"
        out.statuses = responses.statuses
        if not out.garbled and not out.statuses:
            out.garbled = "an incomplete HTTP answer"
        return
    if raw.startswith(b"{"):
        out.protocol = "json"
        text = raw.decode("utf-8", errors="replace")
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(text):
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                out.garbled = f"JSON answer does not parse: {exc}"
                return
            if not isinstance(obj, dict) or not isinstance(obj.get("status"), int):
                out.garbled = f"JSON answer without a status: {str(obj)[:80]}"
                return
            out.statuses.append(obj["status"])
        return
    out.garbled = f"answer in no protocol: {raw[:40]!r}"


def violation(item: FuzzInput, out: Outcome) -> str | None:
    """What the bridge's answer to `item` did wrong, or None (rules in the module doc)."""
    if out.garbled:
        return out.garbled
    if not out.closed:
        return f"no close within the client timeout ({out.elapsed_s:.1f} s)"
    stripped = item.data.lstrip()
    if item.expect == "silent" or not stripped:
        return f"answered {out.statuses} to input that starts no request" if out.statuses else None
    if not out.statuses:
        return "closed without any answer"
    wanted = "json" if stripped.startswith(b"{") else "http"
    if out.protocol != wanted:
        return f"answered in {out.protocol}, the input was {wanted}"
    ok = [s for s in out.statuses if 200 <= s < 300]
    if item.expect == "valid":
        if len(ok) != len(out.statuses) or len(ok) != item.requests:
            return f"valid input ({item.requests} requests) answered {out.statuses}"
        return None
    if item.expect == "invalid" and out.statuses[-1] not in REFUSALS:
        return f"broken input answered {out.statuses}, not ending in one of {REFUSALS}"
    if ok:
        complete = json_requests(item.data) if wanted == "json" else http_requests(item.data)
        if len(ok) > complete:
            return f"{len(ok)} 2xx answers, but an independent parser finds {complete} requests"
    return None


def http_requests(data: bytes) -> int:
    """Complete, well-formed requests h11 finds at the start of `data` (an independent check).

    Where RFC 9112 lets a recipient be lenient and llhttp is, the input is normalised
    first: empty lines (or bare CRs) before the request line are dropped (§2.2) and
    runs of spaces in the request line count as one (§3). h11 also insists on a Host
    header in HTTP/1.1 where the bridge routes without one; a first request missing it
    is given one so that only real malformation counts.
    """
    line, sep, rest = data.lstrip(b"\r\n").partition(b"\r\n")
    data = re.sub(b" +", b" ", line) + sep + rest
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES + HEAD_SLICE)
    conn.receive_data(data)
    conn.receive_data(b"")
    count = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if "Host" in str(exc) and count == 0:
                return _with_host(data)
            return count
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            if event is h11.PAUSED and conn.our_state is h11.SEND_RESPONSE:
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return count
                continue
            return count
        if isinstance(event, h11.EndOfMessage):
            count += 1


def _with_host(data: bytes) -> int:
    line, sep, rest = data.partition(b"\r\n")
    head = data.partition(b"\r\n\r\n")[0].lower()
    if not sep or b"\r\nhost:" in head or b"\r\nhost " in head:
        return 0
    return http_requests(line + b"\r\nHost: oracle" + sep + rest)


def json_requests(data: bytes) -> int:
    """Seed-JSON objects at the start of `data` that strict JSON finds plausible requests."""
    text = data.decode("utf-8", errors="strict") if _utf8(data) else None
    if text is None:
        return 0
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    pos, count = 0, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            return count
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return count
        if not _plausible(obj):
            return count
        count += 1


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _plausible(obj: object) -> bool:
    if not isinstance(obj, dict) or not set(obj) <= JSON_FIELDS:
        return False
    for key, value in obj.items():
        if key == "headers":
            if value is not None and not (
                isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            ):
                return False
        elif value is not None and not isinstance(value, str):
            return False
    return True


# ---- liveness ---------------------------------------------------------------------------


class Liveness:
    """A thread sending a valid request every `period_s` on its own connection, timing each.

    `start()`/`stop()` bracket a probe; `waits` are the latencies (seconds), `failures`
    the requests that got no 2xx. Each request has its own connection so a stalled
    event loop shows up as a long wait, not as one slow keep-alive stream.
    """

    def __init__(self, port: int, request: bytes, period_s: float = 0.05) -> None:
        self.port = port
        self.request = request
        self.period_s = period_s
        self.waits: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._recorded = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> Liveness:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Liveness:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def wait_requests(self, n: int, timeout_s: float) -> bool:
        """Block until `n` requests have been timed (False if `timeout_s` passed first)."""
        with self._recorded:
            return self._recorded.wait_for(lambda: len(self.waits) >= n, timeout_s)

    @property
    def max_wait(self) -> float:
        return max(self.waits, default=0.0)

    @property
    def median_wait(self) -> float:
        return statistics.median(self.waits) if self.waits else 0.0

    def _run(self) -> None:
        while True:
            began = time.monotonic()
            outcome = Outcome()
            with contextlib.suppress(OSError):
                outcome = send(self.port, self.request, timeout_s=5.0)
            with self._recorded:
                self.waits.append(time.monotonic() - began)
                if not outcome.statuses or not all(200 <= s < 300 for s in outcome.statuses):
                    self.failures.append(f"{outcome.klass} {outcome.statuses}")
                self._recorded.notify_all()
            if self._stop.wait(self.period_s):
                return
