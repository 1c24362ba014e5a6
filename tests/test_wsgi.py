"""The WSGI environ the DPUmesh worker runtime builds for a request."""

from __future__ import annotations

from dpumesh.wsgi import build_environ


def test_repeated_headers_are_joined_in_order_and_content_length_is_the_bodys():
    headers = [("X-Tag", "a"), ("content-length", "999"), ("x-tag", "b"), ("Content-Type", "t")]
    environ = build_environ("POST", "/p?q=1", headers, b"body")
    assert environ["HTTP_X_TAG"] == "a,b"
    assert environ["CONTENT_LENGTH"] == "4" and environ["CONTENT_TYPE"] == "t"
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/p", "q=1")


def test_many_repeats_of_one_header_are_all_kept():
    # A 64 KiB head holds about 16,000 one-letter repeats: joined once, in order.
    headers = [("a", str(i % 10)) for i in range(16_000)]
    value = build_environ("GET", "/", headers, b"")["HTTP_A"]
    assert value.split(",") == [str(i % 10) for i in range(16_000)]
