"""A Flask app for end-to-end tests of the DPUmesh runtime, one behaviour per service.

`APP=s0` fans out to s1 and s2 in parallel (the seed README's basic example)
and merges their bodies; other services answer plainly, echo, sleep or fail.
"""

from __future__ import annotations

import os
import time

from flask import Flask, request

from dpumesh import get_context
from dpumesh import requests as mesh_requests

app = Flask(__name__)
SERVICE = os.environ.get("APP", "s0")


def merge(s1, s2):
    return f"s0[{s1.body}|{s2.body}]"


@app.route("/", methods=["GET", "POST"])
@app.route("/api/v1", methods=["GET", "POST"])
def handler():
    ctx = get_context()
    if SERVICE == "s0":
        with ctx.parallel():
            ctx.call("GET", "http://s1/api/v1", id="s1")
            ctx.call("GET", "http://s2.default.svc.cluster.local/api/v1", id="s2")
        ctx.run_internal(merge, inputs=["s1", "s2"])
        return ""
    return f"{SERVICE}:{os.getpid()}"


@app.route("/echo", methods=["POST"])
def echo():
    return request.get_data()


@app.route("/sleep")
def sleep():
    time.sleep(float(request.args.get("s", "0.1")))
    return "slept"


@app.route("/fail")
def fail():
    if SERVICE == "s0":
        get_context().call("GET", "http://s1/fail")
        return ""
    return "broken", 500


@app.route("/blocking")
def blocking():
    reply = mesh_requests.get("http://s1/api/v1")
    return f"via-requests[{reply.status_code}:{reply.text.split(':')[0]}]"
