"""Flask plumbing shared by both runtimes, so they read requests and route identically."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, request

from mubench.cell import Request


def incoming_request() -> Request:
    """The current Flask request as the cell core sees it."""
    return Request(
        request.method,
        request.get_data(),
        request.headers,
        request.query_string.decode("latin-1"),
    )


def add_cell_routes(app: Flask, path: str, view: Callable[[], Any]) -> None:
    """Serve GET/POST on the service's path and on `/` (what benchmark clients hit)."""
    for rule in dict.fromkeys([path, "/"]):
        app.add_url_rule(rule, f"cell{rule}", view, methods=["GET", "POST"])
