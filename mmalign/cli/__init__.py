"""mmalign command line: train, sample, score, eval-judge, pairs, eval, report, export, label.

One module per subcommand, each with `add_parser(subparsers)` and `run(args)`:

    train       fine-tune a generator from a YAML config          (train.py)
    sample      generate images, with plain or reward guidance    (sample.py)
    score       score media files with any reward                 (score.py)
    eval-judge  agreement of a judge with human labels            (eval_judge.py)
    pairs       VLM preference pairs from AI feedback             (pairs.py)
    eval        base vs trained evaluation of a model or run      (eval.py)
    report      an HTML report of runs                            (report.py)
    export      a run's LoRA as diffusers / kohya / peft files    (export.py)
    label       a web page to label pairs for D3PO                (label.py)

The subcommand modules import only argparse at the top; the libraries they drive load
when the command runs, so `mmalign --help` is fast and a missing optional package gives
its subcommand one line naming the package instead of hiding the subcommand.
"""
from __future__ import annotations

import argparse
import os
import sys

from mmalign.progress import throttle_when_not_a_terminal

from . import eval as eval_cmd
from . import eval_judge, label, pairs, report, sample, score, train
from . import export as export_cmd

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
throttle_when_not_a_terminal()  # before tqdm is imported: a bar written to a log redraws once a minute

COMMANDS = {"train": train, "sample": sample, "score": score, "eval-judge": eval_judge, "pairs": pairs,
            "eval": eval_cmd, "report": report, "export": export_cmd,
            "label": label}


def build_parser() -> argparse.ArgumentParser:
    """The `mmalign` parser with every subcommand (each sets `command`)."""
    parser = argparse.ArgumentParser(prog="mmalign", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def missing_package_message(command: str, e: ModuleNotFoundError) -> str:
    """One line naming the missing package of a subcommand and how to install it."""
    package = (e.name or "?").split(".")[0]
    return f"error: mmalign {command} needs the package {package!r}, which is not installed (pip install {package})"


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the subcommand; bad input prints one `error: ...` line and returns 2."""
    args = build_parser().parse_args(argv)
    # deferred: these modules load torch, which `mmalign --help` does not need
    from mmalign.config import ConfigError
    from mmalign.data.preference import DataError
    from mmalign.media import MediaError
    from mmalign.sources import SourceError
    from mmalign.trainer import TrainingError

    try:
        return COMMANDS[args.command].run(args) or 0
    except (ConfigError, DataError, MediaError, TrainingError, SourceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "mmalign":
            raise
        print(missing_package_message(args.command, e), file=sys.stderr)
        return 2
