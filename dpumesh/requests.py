"""`requests`-style blocking HTTP calls that travel over the mesh.

For porting existing handler code: `dpumesh.requests.get(url)` inside a
DPUmesh worker sends the call through the worker's queues to the sidecar and
blocks only the calling thread (a handler or InternalStep pool thread) until
the reply arrives. New code should prefer `ctx.call`, which blocks nothing.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from dpumesh.worker import current_runtime

DEFAULT_TIMEOUT_S = 30.0


class RequestException(Exception):
    """Base of the errors raised here (mirrors `requests`)."""


class Timeout(RequestException):
    """No reply within the timeout."""


class HTTPError(RequestException):
    """Raised by `Response.raise_for_status` for 4xx/5xx."""


@dataclass(slots=True)
class Response:
    """The subset of `requests.Response` that handler code commonly uses."""

    status_code: int
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""
    url: str = ""

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    def raise_for_status(self) -> None:
        if not self.ok:
            raise HTTPError(f"{self.status_code} for {self.url}")


def request(
    method: str,
    url: str,
    *,
    params: dict | None = None,
    headers: dict[str, str] | None = None,
    data: str | bytes | None = None,
    json: Any = None,
    timeout: float | None = None,
) -> Response:
    """Send one request over the mesh and wait for the reply."""
    runtime = current_runtime()
    if runtime is None:
        raise RuntimeError("dpumesh.requests works only inside a DPUmesh worker process")
    header_list = [(str(k), str(v)) for k, v in (headers or {}).items()]
    if json is not None:
        data = jsonlib.dumps(json)
        if not any(k.lower() == "content-type" for k, _ in header_list):
            header_list.append(("content-type", "application/json"))
    body = data.encode("utf-8") if isinstance(data, str) else (data or b"")
    if params:
        url += ("&" if "?" in url else "?") + urlencode(params)
    result = runtime.call_blocking(
        method.upper(), url, header_list, body, timeout or DEFAULT_TIMEOUT_S
    )
    if result is None:
        raise Timeout(f"no reply from {url} within {timeout or DEFAULT_TIMEOUT_S} s")
    content = result.body.encode("utf-8", errors="surrogateescape")
    return Response(
        status_code=result.status_code, headers=result.headers, content=content, url=url
    )


def get(url: str, **kwargs: Any) -> Response:
    """GET over the mesh."""
    return request("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> Response:
    """POST over the mesh."""
    return request("POST", url, **kwargs)
