"""`mmalign label DIR [--port N] [--open]`: label the pairs of `mmalign sample --label-pairs` in a browser."""

from __future__ import annotations

import argparse
import sys

from mmalign.config import flag  # light: yaml and the registries


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `label` subcommand."""
    p = sub.add_parser(
        "label",
        help="a local web page to label the pairs of `mmalign sample --label-pairs`",
        description="Serve DIR's pairs on http://127.0.0.1:PORT/: the two samples side by side; keys "
        "left arrow / 1, right arrow / 2, down arrow / t (tie), s (skip), u (undo). Every "
        "answer is written to DIR/pairs.jsonl at once (atomically).",
    )
    p.add_argument("dir", metavar="DIR", help="a round written by `mmalign sample --label-pairs --out DIR`")
    p.add_argument("--port", type=flag(int, ge=0, le=65535), default=8765, help="port on 127.0.0.1 (default 8765)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl+C; bad input (no pairs, a port in use) prints one line and returns 2."""
    # deferred: starlette and uvicorn load only when the command runs (the `ui` extra)
    from mmalign.label.app import serve
    from mmalign.label.store import LabelError

    try:
        serve(args.dir, args.port, args.open)
    except LabelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
