"""`python -m harness.deploy.compose build|generate`: the image, or a workmodel's compose files.

`generate`'s defaults regenerate the checked-in `compose/default/`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.deploy.compose.image import DEFAULT_BASE_IMAGE, IMAGE, LOCAL_BASE_IMAGE, ensure_image
from harness.deploy.compose.render import generate
from harness.names import DEFAULT_PORT, DEFAULT_WORKMODEL, MESHES, REPO
from harness.stacks import describe
from harness.stacks.cell import load_cell
from harness.stacks.model import Settings
from mubench.workmodel import WorkmodelError

DEFAULT_OUT = REPO / "compose" / "default"


def main(argv: Sequence[str] | None = None) -> int:
    """`build` the image or `generate` compose files."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.deploy.compose",
        description="Docker Compose deployment of the dpumesh, envoy and nomesh stacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build",
        help=f"build {IMAGE} offline (base image and wheelhouse first, when missing)",
    )
    build.add_argument(
        "--base-image",
        metavar="IMAGE",
        help=f"base image (default: {DEFAULT_BASE_IMAGE} if here or pullable, "
        f"else {LOCAL_BASE_IMAGE}, built with debootstrap if missing)",
    )
    gen = sub.add_parser(
        "generate",
        help="write the compose files (and Envoy configs) of a workmodel",
        description="Write <out>/<mesh>.yml for each mesh, and <out>/configs/*.json for envoy. "
        "The defaults regenerate the checked-in compose/default/.",
    )
    gen.add_argument(
        "--workmodel",
        type=Path,
        default=DEFAULT_WORKMODEL,
        metavar="PATH",
        help="μBench workmodel.json (default: workmodels/default.json)",
    )
    gen.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="output directory (default: compose/default)",
    )
    gen.add_argument("--mesh", choices=MESHES, action="append", help="repeatable; default: all")
    gen.add_argument(
        "--port", type=int, default=DEFAULT_PORT, metavar="N", help="public port on 127.0.0.1"
    )
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="μBench random seed")
    gen.add_argument("--scale", type=float, default=1.0, metavar="F", help="μBench work scale")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(f"{IMAGE} {ensure_image(args.base_image)}")
        return 0
    settings = Settings(workmodel=args.workmodel.resolve(), seed=args.seed, scale=args.scale)
    try:
        cell = load_cell(settings)
    except WorkmodelError as exc:
        parser.error(str(exc))
    for mesh in args.mesh or MESHES:
        print(generate(describe(mesh, settings, cell), args.out, port=args.port).file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
