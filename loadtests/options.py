"""The load generator's own command-line / web-UI parameters.

Registered on Locust's parser by `loadtests.locustfile` (via
``events.init_command_line_parser``); every one but ``--mesh-status-url``
(where the web UI's Mesh tab reads the stack's counters, set by
``run_bench.py serve --locust-ui``) also shows in the web UI's start form and
is forwarded by the master to its workers. This module has no Locust import
so it can be unit-tested without gevent's monkey-patching.
"""

from __future__ import annotations

import ipaddress
import json
import math
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUEST_MODES = ("get", "trace")
#: The locustfile's user class every run starts (`loadtests.locustfile.HttpMeshUser`).
USER_CLASS = "HttpMeshUser"
DEFAULT_TRACE: dict[str, Any] = {"s0": [{"s1": {}}, {"s2": {}}]}
DEFAULT_REQUEST_ID_PREFIX = "req-"
LOOPBACK = "127.0.0.1"


class OptionError(ValueError):
    """A load-generator parameter is invalid."""


def add_arguments(parser: Any) -> None:
    """Add our options to Locust's parser (a `LocustArgumentParser`).

    Added on the parser itself, not an argument group: Locust only shows
    arguments added through its own `add_argument` in the web UI.
    """
    ui = {"include_in_web_ui": True}
    parser.add_argument(
        "--request-mode",
        choices=REQUEST_MODES,
        default="get",
        help="get: stochastic 'GET <path>' (the workmodel decides the calls); "
        "trace: trace-driven 'POST <path>' with the --trace-json body",
        **ui,
    )
    parser.add_argument(
        "--trace-json",
        default=json.dumps(DEFAULT_TRACE),
        help="JSON trace sent as the POST body in trace mode, or @FILE to read it from a file",
        **ui,
    )
    parser.add_argument(
        "--request-path",
        default="/",
        help="Request path (default '/'; the mesh routes '/<service>/...' or defaults to s0)",
        **ui,
    )
    parser.add_argument(
        "--open-loop-rate",
        type=float,
        default=0.0,
        help="Open loop: requests per second for the WHOLE test (all users, all processes); "
        "latency is measured from each request's intended send time. 0 = closed loop",
        **ui,
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=0.0,
        help="Seconds at the start of the schedule whose requests are sent but not recorded "
        "in the histogram/sidecar (Locust's own stats still include them)",
        **ui,
    )
    parser.add_argument(
        "--hdr-out",
        default="",
        help="Write this process's µs latency histogram here at test stop (workers of a "
        "distributed run add .w<index> before the suffix); a .json sidecar goes next to it",
        **ui,
    )
    parser.add_argument(
        "--request-id-prefix",
        default=DEFAULT_REQUEST_ID_PREFIX,
        help="Each request carries x-request-id: <prefix><global sequence number>, the same "
        "sequence in every run, so μBench's sampling is reproducible across stacks",
        **ui,
    )
    parser.add_argument(
        "--mesh-status-url",
        default="",
        help=f"http://{LOOPBACK}:PORT/PATH answering the stack's request counters as JSON, "
        "for the web UI's Mesh tab (set by run_bench.py serve --locust-ui)",
        include_in_web_ui=False,  # Locust's default is True
    )


@dataclass(frozen=True)
class LoadOptions:
    """Validated load-generator parameters."""

    request_mode: str = "get"
    trace: Any = None
    body: bytes = b""
    path: str = "/"
    open_loop_rate: float = 0.0
    warmup_s: float = 0.0
    hdr_out: str = ""
    request_id_prefix: str = DEFAULT_REQUEST_ID_PREFIX
    mesh_status_url: str = ""

    @property
    def method(self) -> str:
        return "POST" if self.request_mode == "trace" else "GET"

    @property
    def open_loop(self) -> bool:
        return self.open_loop_rate > 0


def parse_trace(text: str) -> Any:
    """A trace from JSON text or ``@file``; must be a JSON object."""
    text = (text or "").strip()
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise OptionError(f"--trace-json: cannot read {text[1:]!r}: {exc}") from None
    try:
        trace = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--trace-json is not valid JSON: {exc}") from None
    if not isinstance(trace, dict) or not trace:
        raise OptionError("--trace-json must be a non-empty JSON object {service: [groups]}")
    return trace


def status_url(text: str) -> str:
    """`text` if it is an ``http://<address>:PORT/...`` URL with a loopback or private IPv4
    address ("" = none): the harness's own endpoint, on this machine or on the bridge of
    its nodes (`--nodes`), so the UI's polling stays on this machine."""
    if not text:
        return ""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise OptionError(f"--mesh-status-url: {exc}") from None
    if parts.scheme != "http" or not _local_address(parts.hostname) or port is None:
        raise OptionError(
            f"--mesh-status-url must be http://{LOOPBACK}:PORT/... (or a private IPv4 "
            f"address), not {text!r}"
        )
    return text


def from_namespace(ns: Any) -> LoadOptions:
    """`LoadOptions` from Locust's ``environment.parsed_options`` (None -> defaults).

    Values typed into the web UI arrive with the type of their default, so
    everything is checked again here. Raises `OptionError`.
    """

    def get(name: str, default: Any) -> Any:
        value = getattr(ns, name, default) if ns is not None else default
        return default if value is None else value

    mode = str(get("request_mode", "get")).strip().lower()
    if mode not in REQUEST_MODES:
        raise OptionError(f"--request-mode must be one of {REQUEST_MODES}, not {mode!r}")
    try:
        rate = float(get("open_loop_rate", 0.0))
        warmup = float(get("warmup_s", 0.0))
    except (TypeError, ValueError) as exc:
        raise OptionError(f"bad number: {exc}") from None
    if not math.isfinite(rate) or rate < 0:
        raise OptionError(f"--open-loop-rate must be >= 0, not {rate}")
    if not math.isfinite(warmup) or warmup < 0:
        raise OptionError(f"--warmup-s must be >= 0, not {warmup}")
    path = str(get("request_path", "/")) or "/"
    if not path.startswith("/"):
        raise OptionError(f"--request-path must start with '/', not {path!r}")
    trace = None
    body = b""
    if mode == "trace":
        trace = parse_trace(str(get("trace_json", json.dumps(DEFAULT_TRACE))))
        body = json.dumps(trace, separators=(",", ":")).encode("utf-8")
    return LoadOptions(
        request_mode=mode,
        trace=trace,
        body=body,
        path=path,
        open_loop_rate=rate,
        warmup_s=warmup,
        hdr_out=str(get("hdr_out", "")),
        request_id_prefix=str(get("request_id_prefix", DEFAULT_REQUEST_ID_PREFIX)),
        mesh_status_url=status_url(str(get("mesh_status_url", ""))),
    )


def _local_address(host: str | None) -> bool:
    """Whether `host` is a loopback or private IPv4 literal (never a name to resolve)."""
    try:
        address = ipaddress.IPv4Address(host or "")
    except ValueError:
        return False
    return address.is_loopback or address.is_private
