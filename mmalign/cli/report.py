"""`mmalign report RUN [RUN ...] [--out FILE]`: one self-contained HTML page of one run or several."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `report` subcommand."""
    p = sub.add_parser(
        "report",
        help="write an HTML report of runs: curves, sample grids, pairs, config",
        description="One self-contained HTML file: reward / gold / diversity / KL curves (runs "
        "overlaid), evaluation grids with a step slider, before/after per prompt, the "
        "training pairs or rollouts, each run's config.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --output-dir of `mmalign train`)")
    p.add_argument("--out", help="the HTML file (default: RUN/report.html for one run, report.html for several)")


def run(args: argparse.Namespace) -> int:
    """Write the report; a RUN that is not a run directory prints one line and returns 2."""
    # deferred: matplotlib loads only when the command runs (a fast `mmalign --help`)
    from mmalign.report import ReportError, build_report

    out = args.out or (str(Path(args.runs[0]) / "report.html") if len(args.runs) == 1 else "report.html")
    try:
        path = build_report(args.runs, out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); open it in a browser")
    return 0
