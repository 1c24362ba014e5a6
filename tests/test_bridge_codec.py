"""The port-5005 codec: protocol detection, HTTP and JSON parsing, limits, rendering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpumesh.bridge_codec import BadRequest, BridgeParser, render_http, render_json

SEED_REQUEST = {
    "method": "POST",
    "path": "/api/v1",
    "headers": {"Content-Type": "application/json"},
    "body": json.dumps({"s0": [{"s1": {}, "s2": {}}]}),
    "query_string": "",
}


def test_http_keep_alive_and_pipelining():
    parser = BridgeParser(max_body=100)
    reqs = parser.feed(
        b"GET /s1/api?x=1 HTTP/1.1\r\nHost: s1\r\n\r\n"
        b"POST /api/v1 HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    )
    assert [(r.method, r.path, r.query, r.body, r.keep_alive) for r in reqs] == [
        ("GET", "/s1/api", "x=1", b"", True),
        ("POST", "/api/v1", "", b"abc", False),
    ]
    assert reqs[0].header("HOST") == "s1"
    assert parser.protocol == "http"


def test_http_request_split_byte_by_byte():
    raw = b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    parser = BridgeParser(max_body=100)
    out = []
    for i in range(len(raw)):
        out += parser.feed(raw[i : i + 1])
        assert parser.in_progress == (i < len(raw) - 1)
    assert [r.body for r in out] == [b"hello"]


def test_chunked_body():
    parser = BridgeParser(max_body=100)
    (req,) = parser.feed(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert req.body == b"abcde"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\x00\x01\x02garbage", 400),
        (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"[1, 2]", 400),
    ],
)
def test_bad_input_is_refused_with_a_status(raw, status):
    with pytest.raises(BadRequest) as err:
        BridgeParser(max_body=1000).feed(raw)
    assert err.value.status == status


def test_chunked_body_over_the_limit():
    parser = BridgeParser(max_body=4)
    with pytest.raises(BadRequest) as err:
        parser.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n")
    assert err.value.status == 413


def test_seed_json_request_in_pieces():
    raw = json.dumps(SEED_REQUEST).encode()
    parser = BridgeParser(max_body=1000)
    assert parser.feed(raw[:20]) == []
    assert parser.in_progress
    (req,) = parser.feed(raw[20:])
    assert (req.protocol, req.method, req.path) == ("json", "POST", "/api/v1")
    assert json.loads(req.body) == {"s0": [{"s1": {}, "s2": {}}]}
    assert req.header("content-type") == "application/json"
    assert not parser.in_progress


def test_json_braces_inside_strings_do_not_end_the_object():
    obj = dict(SEED_REQUEST, body="}}} {{{")
    raw = json.dumps(obj).encode()
    parser = BridgeParser(max_body=1000)
    cut = raw.index(b"}}}") + 1
    assert parser.feed(raw[:cut]) == []
    (req,) = parser.feed(raw[cut:])
    assert req.body == b"}}} {{{"


def test_json_target_service_and_url():
    parser = BridgeParser(max_body=1000)
    (req,) = parser.feed(json.dumps({"target_service": "s2", "url": "http://s2/x"}).encode())
    assert (req.target_service, req.url, req.method, req.path) == ("s2", "http://s2/x", "GET", "/")


@pytest.mark.parametrize(
    "obj",
    [
        {"method": 5},
        {"headers": ["a"]},
        {"headers": {"a": 1}},
        {"body": {"nested": True}},
        {"unexpected": 1},
        {"method": "G T"},
        # Nothing that could change the framing of a request forwarded to a peer:
        {"path": "/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y"},
        {"path": "/caf\u00e9"},
        {"query_string": "a b"},
        {"headers": {"x": "a\r\nX-Injected: 1"}},
        {"headers": {"bad name": "v"}},
        {"headers": {"x": "\u20ac"}},
    ],
)
def test_invalid_json_fields(obj):
    with pytest.raises(BadRequest) as err:
        BridgeParser(max_body=1000).feed(json.dumps(obj).encode())
    assert err.value.status == 400


def test_truncated_json_is_an_error_at_eof():
    parser = BridgeParser(max_body=1000)
    parser.feed(b'{"method": "GET", "pa')
    with pytest.raises(BadRequest):
        parser.eof()


def test_oversized_json():
    with pytest.raises(BadRequest) as err:
        BridgeParser(max_body=10).feed(b'{"body": "' + b"x" * 100000)
    assert err.value.status == 413


@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(data):
    parser = BridgeParser(max_body=1000)
    try:
        parser.feed(data)
        parser.eof()
    except BadRequest as exc:
        assert 400 <= exc.status < 500


def test_render_http_replaces_framing_headers():
    raw = render_http(
        200, [("Content-Length", "999"), ("X-A", "1")], b"hello", keep_alive=False
    ).decode()
    head, body = raw.split("\r\n\r\n")
    assert head.splitlines()[0] == "HTTP/1.1 200 OK"
    assert "Content-Length: 999" not in head
    assert "content-length: 5" in head and "connection: close" in head
    assert body == "hello"


def test_render_json_matches_the_seed_shape():
    obj = json.loads(render_json(7, 200, [("a", "b")], b"body"))
    assert obj == {"req_id": 7, "status": 200, "headers": {"a": "b"}, "body": "body"}
