"""Call a WSGI application (Flask) with a request that arrived over the mesh.

No server socket is involved: the worker runtime turns a queue message into a
WSGI environ, calls the app in a pool thread and collects status, headers and
body. Kept separate so the environ rules are testable on their own.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable
from urllib.parse import unquote

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


def build_environ(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    server_name: str = "dpumesh",
    extra: dict | None = None,
) -> dict:
    """A PEP 3333 environ for one request; `target` is path plus optional query."""
    path, _, query = target.partition("?")
    environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path or "/", encoding="latin-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": server_name,
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    repeated: dict[str, list[str]] = {}  # joined once: repeats cost linear, not quadratic
    for name, value in headers:
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
        elif key == "CONTENT_LENGTH":
            continue  # the body we hold is authoritative
        else:
            repeated.setdefault("HTTP_" + key, []).append(value)
    environ.update((key, ",".join(values)) for key, values in repeated.items())
    if extra:
        environ.update(extra)
    return environ


def call_app(app: WsgiApp, environ: dict) -> tuple[int, list[tuple[str, str]], bytes]:
    """Run the app; returns (status code, headers, body)."""
    captured: dict = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info=None):
        if exc_info and captured:
            raise exc_info[1].with_traceback(exc_info[2])
        captured["status"] = status
        captured["headers"] = headers
        return lambda data: chunks.append(data)

    chunks: list[bytes] = []
    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    code = int(captured["status"].split(" ", 1)[0])
    return code, list(captured["headers"]), b"".join(chunks)
