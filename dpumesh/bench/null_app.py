"""A Flask app whose handler does nothing: isolates the mesh's own latency."""

from flask import Flask

app = Flask(__name__)


@app.route("/", methods=["GET", "POST"])
def nothing() -> str:
    return "ok"
