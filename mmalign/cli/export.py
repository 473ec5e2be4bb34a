"""`mmalign export RUN --format diffusers | kohya | peft [--out DIR]`: a run's LoRA for other tools."""

from __future__ import annotations

import argparse
import sys

FORMATS = ("diffusers", "kohya", "peft")  # mmalign.export.FORMATS, repeated to keep `--help` light


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `export` subcommand."""
    p = sub.add_parser(
        "export",
        help="export a run's LoRA for diffusers, ComfyUI / AUTOMATIC1111 (kohya) or peft",
        description="Write RUN's trained LoRA (RUN/final/) in diffusers, kohya (ComfyUI, AUTOMATIC1111, "
        "Forge; SD1.5, SDXL, FLUX) or peft format, with a model card README.md.",
    )
    p.add_argument("run", help="a run directory (the --output-dir of `mmalign train`)")
    p.add_argument("--format", required=True, help="diffusers | kohya | peft")
    p.add_argument("--out", help="output directory (default: RUN/export/FORMAT)")


def run(args: argparse.Namespace) -> int:
    """Export; bad input (not a run, no LoRA, unknown format) prints one line and returns 2."""
    if args.format not in FORMATS:
        print(f"error: --format {args.format!r}: unknown format; expected one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    # deferred: torch, diffusers and peft load only when the command runs (a fast `mmalign --help`)
    from mmalign.export import ExportError, export_run

    try:
        out = export_run(args.run, args.format, args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {out} (with README.md, the model card)")
    return 0
