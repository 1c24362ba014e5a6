"""`python -m harness.deploy.compose build|generate`: the image, or a workmodel's compose files.

`generate`'s defaults regenerate the checked-in `compose/default/`. Its stack
options are the harness's settings (`harness.run.config`, declared once for
every entry point); this command line is an edge, so it may import `harness.run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.deploy.compose.image import DEFAULT_BASE_IMAGE, IMAGE, LOCAL_BASE_IMAGE, ensure_image
from harness.deploy.compose.render import generate
from harness.names import MESHES, REPO
from harness.placement.profiles import resolve
from harness.run import config
from harness.run.runner import model_overrides, settings_of
from harness.stacks import describe
from harness.stacks.cell import load_cell
from mubench.workmodel import WorkmodelError

DEFAULT_OUT = REPO / "compose" / "default"


def _parser() -> argparse.ArgumentParser:
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
        description="Write <out>/<mesh>.yml for each mesh, and <out>/<mesh>/configs/*.json for "
        "the Envoy stacks. "
        "The defaults regenerate the checked-in compose/default/.",
    )
    gen.add_argument(
        "--out",
        dest="compose_dir",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="output directory (default: compose/default)",
    )
    gen.add_argument("--mesh", choices=MESHES, action="append", help="repeatable; default: all")
    config.add_options(gen, "compose")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`build` the image or `generate` compose files."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "build":
        print(f"{IMAGE} {ensure_image(args.base_image)}")
        return 0
    try:
        settings_config = config.for_command("compose", args)
        model = resolve(settings_config.dpu_profile, model_overrides(settings_config))
        settings = settings_of(settings_config, model)  # the DPU model's DMA cost
        cell = load_cell(settings)
    except (config.ConfigError, WorkmodelError) as exc:
        parser.error(str(exc))
    for mesh in args.mesh or MESHES:
        print(
            generate(
                describe(mesh, settings, cell), args.compose_dir, port=settings_config.port
            ).file
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
