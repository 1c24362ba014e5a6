"""Message format for everything that crosses a DPUmesh shared-memory queue.

A shared-memory peer must never be able to run code in another process, so
messages are plain bytes with a fixed header (no pickle). Layout, little-endian:

    offset size field
    0      1    kind         1 = request, 2 = response
    1      1    flags        reserved, 0
    2      2    status       HTTP status (responses), 0 for requests
    4      8    req_id       correlation id chosen by the originator
    12     8    deadline_ns  absolute CLOCK_MONOTONIC deadline, 0 = none
    20     2    method_len
    22     4    target_len
    26     4    headers_len
    30     4    body_len
    34     ...  method, target, headers, body (in that order)

`target` is the request path (ingress) or the full URL (egress); headers are
encoded as `name \\0 value \\0` pairs in latin-1 (HTTP forbids NUL in both).
`decode` checks every length against the buffer and raises `WireError` on any
inconsistency, so a corrupt or hostile entry fails loudly instead of being
misread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

REQUEST = 1
RESPONSE = 2

_HEADER = struct.Struct("<BBHQQHIII")
HEADER_SIZE = _HEADER.size
_KINDS = (REQUEST, RESPONSE)


class WireError(ValueError):
    """An entry that is not a well-formed message."""


@dataclass(slots=True)
class Message:
    """One request or response travelling between sidecar and workers."""

    kind: int
    req_id: int
    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    status: int = 0
    deadline_ns: int = 0

    def header(self, name: str, default: str | None = None) -> str | None:
        """Return the first header called `name` (case-insensitive)."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return default


def _encode_headers(headers: list[tuple[str, str]]) -> bytes:
    if not headers:
        return b""
    parts: list[str] = []
    for key, value in headers:
        parts.append(key)
        parts.append(value)
    text = "\0".join(parts) + "\0"
    return text.encode("latin-1")


def _decode_headers(raw: bytes) -> list[tuple[str, str]]:
    if not raw:
        return []
    if raw[-1:] != b"\0":
        raise WireError("headers block is not NUL-terminated")
    items = raw[:-1].decode("latin-1").split("\0")
    if len(items) % 2:
        raise WireError("headers block has a name without a value")
    return list(zip(items[0::2], items[1::2], strict=True))


def encode(msg: Message) -> bytes:
    """Serialise `msg`; raises `WireError` for values that do not fit the header."""
    if msg.kind not in _KINDS:
        raise WireError(f"unknown kind {msg.kind}")
    try:
        method = msg.method.encode("ascii")
        target = msg.target.encode("latin-1")
        headers = _encode_headers(msg.headers)
    except UnicodeEncodeError as exc:
        raise WireError(f"unencodable text: {exc}") from None
    body = msg.body
    try:
        head = _HEADER.pack(
            msg.kind,
            0,
            msg.status,
            msg.req_id,
            msg.deadline_ns,
            len(method),
            len(target),
            len(headers),
            len(body),
        )
    except struct.error as exc:
        raise WireError(f"field out of range: {exc}") from None
    return b"".join((head, method, target, headers, body))


def decode(buf: bytes | bytearray | memoryview) -> Message:
    """Parse one message, validating every length; raises `WireError`."""
    if len(buf) < HEADER_SIZE:
        raise WireError(f"entry of {len(buf)} bytes is shorter than the header")
    kind, _flags, status, req_id, deadline_ns, mlen, tlen, hlen, blen = _HEADER.unpack_from(buf)
    if kind not in _KINDS:
        raise WireError(f"unknown kind {kind}")
    if HEADER_SIZE + mlen + tlen + hlen + blen != len(buf):
        raise WireError("declared lengths do not match the entry size")
    view = memoryview(buf)
    pos = HEADER_SIZE
    method = bytes(view[pos : pos + mlen])
    pos += mlen
    target = bytes(view[pos : pos + tlen])
    pos += tlen
    headers = _decode_headers(bytes(view[pos : pos + hlen]))
    pos += hlen
    body = bytes(view[pos : pos + blen])
    try:
        method_text = method.decode("ascii")
    except UnicodeDecodeError:
        raise WireError("method is not ASCII") from None
    return Message(
        kind=kind,
        req_id=req_id,
        method=method_text,
        target=target.decode("latin-1"),
        headers=headers,
        body=body,
        status=status,
        deadline_ns=deadline_ns,
    )
