"""The shared-memory message format: round trips and rejection of bad entries."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpumesh import wire

_header_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255), min_size=0, max_size=20
)


@given(
    kind=st.sampled_from([wire.REQUEST, wire.RESPONSE]),
    req_id=st.integers(0, 2**64 - 1),
    status=st.integers(0, 999),
    deadline=st.integers(0, 2**64 - 1),
    method=st.sampled_from(["GET", "POST", "PUT", ""]),
    target=_header_text,
    headers=st.lists(st.tuples(_header_text.filter(bool), _header_text), max_size=5),
    body=st.binary(max_size=2000),
)
def test_round_trip(kind, req_id, status, deadline, method, target, headers, body):
    msg = wire.Message(
        kind=kind,
        req_id=req_id,
        method=method,
        target=target,
        headers=headers,
        body=body,
        status=status,
        deadline_ns=deadline,
    )
    assert wire.decode(wire.encode(msg)) == msg


def test_header_lookup_is_case_insensitive():
    msg = wire.Message(kind=wire.REQUEST, req_id=1, headers=[("X-Request-Id", "abc")])
    assert msg.header("x-request-id") == "abc"
    assert msg.header("missing", "d") == "d"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:10],  # shorter than the header
        lambda b: b[:-1],  # body truncated
        lambda b: b + b"x",  # trailing garbage
        lambda b: bytes([9]) + b[1:],  # unknown kind
    ],
)
def test_malformed_entries_raise(mutate):
    good = wire.encode(wire.Message(kind=wire.REQUEST, req_id=7, method="GET", target="/x"))
    with pytest.raises(wire.WireError):
        wire.decode(mutate(good))


def test_headers_block_must_be_well_formed():
    head = struct.pack("<BBHQQHIII", wire.REQUEST, 0, 0, 1, 0, 0, 0, 3, 0)
    with pytest.raises(wire.WireError):
        wire.decode(head + b"a\0b")  # not NUL-terminated
    head = struct.pack("<BBHQQHIII", wire.REQUEST, 0, 0, 1, 0, 0, 0, 2, 0)
    with pytest.raises(wire.WireError):
        wire.decode(head + b"a\0")  # name without value


def test_unencodable_values_raise():
    with pytest.raises(wire.WireError):
        wire.encode(wire.Message(kind=wire.REQUEST, req_id=-1))
    with pytest.raises(wire.WireError):
        wire.encode(wire.Message(kind=wire.REQUEST, req_id=1, method="GÉT"))
    with pytest.raises(wire.WireError):
        wire.encode(wire.Message(kind=3, req_id=1))
