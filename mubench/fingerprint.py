"""What code a μBench cell runs: interpreter and a hash of the `mubench` package's sources.

`python -m mubench.fingerprint` prints it as JSON, so a deployer can ask the
interpreter its apps really run (locally, or inside a container) and the
fairness checklist can compare stacks by what ran rather than by what was meant.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any


def fingerprint() -> dict[str, Any]:
    """Interpreter version and the sha256 over every `mubench/*.py` (name and content)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "mubench_sha256": digest.hexdigest(),
    }


if __name__ == "__main__":
    print(json.dumps(fingerprint()))
