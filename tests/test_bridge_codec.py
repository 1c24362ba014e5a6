"""The port-5005 codec: protocol detection, HTTP and JSON parsing, limits, rendering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpumesh.bridge_codec import (
    HEAD_SLICE,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    MAX_SERVICE_BYTES,
    BadRequest,
    BridgeParser,
    render_http,
    render_json,
)
from dpumesh.routing import egress_target

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


# ---- hostile input (DESIGN §9): linear work, bounded buffering, a 4xx for everything ----

CHUNKED_HEAD = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


def one_byte_chunks(n: int) -> bytes:
    return CHUNKED_HEAD + b"1\r\nx\r\n" * n + b"0\r\n\r\n"


class CountingList(list):
    """A body-chunk list that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        CountingList.walks += 1
        return super().__iter__()


def test_fifty_thousand_one_byte_chunks_are_parsed_in_linear_work(monkeypatch):
    from dpumesh import bridge_codec

    original = bridge_codec._HttpCallbacks._reset

    def reset(self):
        original(self)
        self.body = CountingList()

    monkeypatch.setattr(bridge_codec._HttpCallbacks, "_reset", reset)
    CountingList.walks = 0
    raw = one_byte_chunks(50_000)
    parser = BridgeParser(max_body=100_000)
    (req,) = parser.feed(raw)
    assert req.body == b"x" * 50_000
    # The chunks were joined once at the end, not summed once per chunk (which was
    # quadratic: 18.7 s for this request); every byte went into httptools exactly once,
    # in a bounded number of calls.
    assert CountingList.walks <= 1
    assert parser.http_bytes_fed == len(raw)
    assert parser.http_feeds <= len(raw) // HEAD_SLICE + 2


def test_one_byte_chunks_arriving_one_chunk_per_feed():
    parser = BridgeParser(max_body=100_000)
    assert parser.feed(CHUNKED_HEAD) == []
    for _ in range(50_000):
        assert parser.feed(b"1\r\nx\r\n") == []
    (req,) = parser.feed(b"0\r\n\r\n")
    assert len(req.body) == 50_000


@pytest.mark.parametrize("piece", [1 << 20, 65536, 4096, 1000])
def test_a_64_mib_unfinished_header_is_refused_after_at_most_cap_plus_a_slice(piece):
    parser = BridgeParser(max_body=1000)
    parser.feed(b"GET / HTTP/1.1\r\nX: ")
    blob = b"a" * piece
    with pytest.raises(BadRequest) as err:
        for _ in range((64 << 20) // piece):
            parser.feed(blob)
    assert err.value.status == 431
    assert parser.http_bytes_fed <= MAX_HEADER_BYTES + 1 + HEAD_SLICE
    assert len(parser._held) < HEAD_SLICE  # nothing more is buffered on the way


def test_an_unfinished_header_after_a_pipelined_request_is_capped_too():
    first = b"GET /a HTTP/1.1\r\n\r\n"
    parser = BridgeParser(max_body=1000)
    with pytest.raises(BadRequest) as err:
        parser.feed(first + b"GET /b HTTP/1.1\r\nX: " + b"a" * (64 << 20))
    assert err.value.status == 431
    assert parser.http_bytes_fed - len(first) <= MAX_HEADER_BYTES + 1 + HEAD_SLICE


def test_a_head_under_the_cap_dribbled_byte_by_byte_is_fed_in_few_calls():
    value = b"v" * (MAX_HEADER_BYTES - 100)
    raw = b"GET / HTTP/1.1\r\nX: " + value + b"\r\n\r\n"
    parser = BridgeParser(max_body=1000)
    out = []
    for i in range(len(raw)):
        out += parser.feed(raw[i : i + 1])
    (req,) = out
    assert req.header("x") == value.decode()
    # Partial lines are held back: httptools (which concatenates an unfinished value on
    # every call) sees the value in whole slices, not once per byte.
    assert parser.http_feeds <= len(raw) // HEAD_SLICE + 4


def test_endless_blank_lines_between_requests_are_refused():
    parser = BridgeParser(max_body=1000)
    parser.feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(BadRequest) as err:
        for _ in range(1000):
            parser.feed(b"\r\n" * 1000)
    assert err.value.status == 431


def test_endless_whitespace_before_any_request_is_refused():
    parser = BridgeParser(max_body=1000)
    with pytest.raises(BadRequest) as err:
        for _ in range(1000):
            parser.feed(b" " * 1000)
    assert err.value.status == 400


def test_trailers_are_counted_not_forwarded():
    parser = BridgeParser(max_body=1000)
    (req,) = parser.feed(CHUNKED_HEAD + b"2\r\nab\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert req.body == b"ab" and req.header("x-trailer") is None


@pytest.mark.parametrize(
    "tail",
    [
        b"0\r\nX-Trailer: " + b"t" * (1 << 20),  # a trailer that never ends
        b"1;" + b"e" * (1 << 20),  # a chunk extension that never ends
    ],
)
def test_endless_chunk_framing_is_refused(tail):
    parser = BridgeParser(max_body=1000)
    parser.feed(CHUNKED_HEAD)
    fed = parser.http_bytes_fed
    with pytest.raises(BadRequest) as err:
        for i in range(0, len(tail), 4096):
            parser.feed(tail[i : i + 4096])
    assert err.value.status in (400, 431)
    assert parser.http_bytes_fed - fed <= MAX_HEADER_BYTES + 1 + HEAD_SLICE


PIPELINE = (
    b"POST /s1/a?x=1 HTTP/1.1\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"
    + CHUNKED_HEAD
    + b"3\r\nabc\r\n0\r\n\r\n"
    + b"GET /b HTTP/1.1\r\nHost: s2\r\n\r\n"
)


def test_pipelined_requests_split_anywhere_parse_the_same():
    expected = [(r.method, r.path, r.body) for r in BridgeParser(100).feed(PIPELINE)]
    assert expected == [("POST", "/s1/a", b"hello"), ("POST", "/", b"abc"), ("GET", "/b", b"")]
    for cut in range(1, len(PIPELINE)):
        for cut2 in (cut, min(len(PIPELINE), cut + 7)):
            parser = BridgeParser(max_body=100)
            out = parser.feed(PIPELINE[:cut]) + parser.feed(PIPELINE[cut:cut2])
            out += parser.feed(PIPELINE[cut2:])
            assert [(r.method, r.path, r.body) for r in out] == expected, cut
            assert not parser.in_progress


def test_a_held_back_partial_line_counts_as_in_progress():
    parser = BridgeParser(max_body=100)
    assert parser.feed(b"GET / HTT") == []
    assert parser.in_progress
    with pytest.raises(BadRequest):
        parser.eof()


def nested(depth: int, opener: bytes = b'{"a":', closer: bytes = b"}") -> bytes:
    return opener * depth + b"1" + closer * depth


@pytest.mark.parametrize(
    "raw",
    [
        nested(100_000),
        nested(1_000_000),
        b'{"a":' + nested(1_000_000, b"[", b"]") + b"}",
        b'{"body": ' + b"1" * 5000 + b"}",
        b'{"body": "\\ud800"}',
        b'{"body": "\\udfff\\ud800"}',
        b'{"url": "http://[::1"}',
        b'{"url": "http://[::1/x"}',
        b'{"url": "http://s1:99999/x"}',
        b'{"url": "http://s1:-1/x"}',
        b'{"url": "http://s1:port/x"}',
        b'{"url": "http:///x"}',
        b'{"url": "http://:80/x"}',
        b'{"url": "http://user@/x"}',
        b'{"url": "ftp://s1/x"}',
        b'{"url": "http://s 1/x"}',
        b'{"url": "http://s1/\\u00e9"}',
        b'{"url": "' + b"a" * 9000 + b'"}',
        b'{"method": NaN}',
        b'{"body": Infinity}',
        b'{"body": -Infinity}',
        b'{"body": 1e999}',
        b'{"headers": {"a": 1.5}}',
        b'{"method": "GET", "method": "POST"}',
        b'{"headers": {"a": "1", "a": "2"}}',
        b'{"a" 1}',
        b'{"body": "x"]',
        b'{"body": "x",}',
        b'{"body": "\xff\xfe"}',
        b'{"body": "tab\there"}',
        b'{"path": "no-slash"}',
        b'{"method": "' + b"G" * 100 + b'"}',
        b'{"target_service": "' + b"s" * 64 + b'"}',
        b'{"target_service": "s\\u0000"}',
        b'{"target_service": "\\ud800"}',
        b'{"headers": {"\\ud800": "v"}}',
        b'{"headers": {"x": "\\ud800"}}',
        b"{} garbage",
    ],
)
def test_malformed_seed_json_is_a_400_with_a_reason(raw):
    parser = BridgeParser(max_body=1 << 23)
    with pytest.raises(BadRequest) as err:
        parser.feed(raw)
        parser.eof()
    assert err.value.status == 400
    assert err.value.reason


@pytest.mark.parametrize(
    "field", sorted(["method", "path", "headers", "body", "query_string", "target_service", "url"])
)
@pytest.mark.parametrize("value", [1, 2.5, True, [], ["a"], {"a": "b"}])
def test_every_field_of_the_wrong_type_is_a_400(field, value):
    if field == "headers" and value == {"a": "b"}:
        value = {"a": ["b"]}
    with pytest.raises(BadRequest) as err:
        BridgeParser(max_body=1000).feed(json.dumps({field: value}).encode())
    assert err.value.status == 400


def test_json_nesting_at_the_limit_is_still_parsed():
    # headers: {...} is depth 2; 32 levels of lists inside an unknown field still scan,
    # and then fail validation, not the scanner.
    inner = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)
    with pytest.raises(BadRequest) as err:
        BridgeParser(max_body=1000).feed(b'{"x": ' + inner + b"}")
    assert "unknown JSON request fields" in err.value.reason
    with pytest.raises(BadRequest) as err:
        BridgeParser(max_body=1000).feed(b'{"x": [' + inner + b"]}")
    assert "nested deeper" in err.value.reason


def test_a_large_json_body_in_pieces_ending_in_braces_is_decoded_once(monkeypatch):
    from dpumesh import bridge_codec

    calls = []
    real = bridge_codec._DECODER

    class Counting:
        def decode(self, text):
            calls.append(len(text))
            return real.decode(text)

        def raw_decode(self, text):
            calls.append(len(text))
            return real.raw_decode(text)

    monkeypatch.setattr(bridge_codec, "_DECODER", Counting())
    parser = BridgeParser(max_body=1 << 23)
    assert parser.feed(b'{"body": "') == []
    for _ in range(20_000):
        assert parser.feed(b"x" * 50 + b"}") == []
    (req,) = parser.feed(b'"}')
    assert len(req.body) == 20_000 * 51
    assert len(calls) == 1  # the old decoder re-decoded the whole buffer at every `}`


def test_a_whole_object_in_one_read_and_the_same_object_scanned_agree():
    raw = json.dumps(dict(SEED_REQUEST, body='a "b" {c} [d] \\ e')).encode()
    whole = BridgeParser(max_body=1000).feed(raw)
    parser = BridgeParser(max_body=1000)
    pieces = parser.feed(raw[:1]) + parser.feed(raw[1:])
    assert whole == pieces and len(whole) == 1


def test_pipelined_json_objects_in_one_feed():
    raw = json.dumps({"path": "/a"}).encode() + b"\n " + json.dumps({"path": "/b"}).encode()
    parser = BridgeParser(max_body=1000)
    assert [r.path for r in parser.feed(raw)] == ["/a", "/b"]
    assert not parser.in_progress


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "body": st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40),
            "path": st.text(alphabet='/abc{}[]"\\%', max_size=20).map(lambda p: "/" + p),
            "headers": st.dictionaries(
                st.sampled_from(["a", "b", "X-Y"]), st.text(alphabet='ab{}"\\ ', max_size=10)
            ),
        },
    ),
    st.data(),
)
def test_json_split_anywhere_parses_the_same(obj, data):
    raw = json.dumps(obj, ensure_ascii=data.draw(st.booleans())).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    parser = BridgeParser(max_body=1000)
    out = []
    prev = 0
    for cut in [*cuts, len(raw)]:
        out += parser.feed(raw[prev:cut])
        prev = cut
    (req,) = out
    assert req.body == obj.get("body", "").encode()
    assert req.headers == list(obj.get("headers", {}).items())


def test_json_url_and_service_that_are_accepted():
    ok = [
        {"url": "http://s1/x"},
        {"url": "s1:8080/x"},
        {"url": "http://[::1]:5005/x"},
        {"url": "http://S1.default.svc.cluster.local/x"},
        {"target_service": "ms-001"},
        {"target_service": "s" * 63},
        {"target_service": ""},  # empty means none, like null
    ]
    for obj in ok:
        (req,) = BridgeParser(max_body=1000).feed(json.dumps(obj).encode())
        assert req.url == obj.get("url")


def test_the_service_name_limit_matches_the_registry():
    from dpumesh import registry

    assert MAX_SERVICE_BYTES == registry.MAX_SERVICE_BYTES


@given(st.text(max_size=60))
def test_egress_target_never_raises(url):
    target = egress_target(url, {"s1"})
    assert target is None or target.service


@pytest.mark.parametrize(
    "url", ["http://[::1", "http://[::1/x", "[", "http://]/", "http://:80/x", "http://u@/x"]
)
def test_egress_target_of_a_bad_url_is_none(url):
    assert egress_target(url, {"s1"}) is None


@given(st.binary(max_size=300), st.integers(1, 300))
def test_random_bytes_in_random_pieces_never_crash_the_parser(data, step):
    parser = BridgeParser(max_body=1000)
    try:
        for i in range(0, len(data), step):
            parser.feed(data[i : i + step])
        parser.eof()
    except BadRequest as exc:
        assert 400 <= exc.status < 500


def test_framing_headers_are_not_passed_on_with_the_deframed_body():
    (req,) = BridgeParser(max_body=100).feed(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n2\r\nab\r\n0\r\n\r\n"
    )
    assert (req.body, req.headers) == (b"ab", [("X-A", "1")])
    (req,) = BridgeParser(max_body=100).feed(
        b"POST / HTTP/1.1\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nab"
    )
    assert (req.body, req.headers) == (b"ab", [("X-A", "1")])
    obj = {"body": "ab", "headers": {"Transfer-Encoding": "chunked", "Content-Length": "9"}}
    (req,) = BridgeParser(max_body=100).feed(json.dumps(obj).encode())
    assert (req.body, req.headers) == (b"ab", [])
