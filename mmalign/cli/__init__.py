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
import errno
import os
import sys
import typing

from mmalign.progress import throttle_when_not_a_terminal

from . import eval as eval_cmd
from . import eval_judge, label, pairs, report, sample, score, train
from . import export as export_cmd

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
throttle_when_not_a_terminal()  # before tqdm is imported: a bar written to a log redraws once a minute

COMMANDS = {
    "train": train,
    "sample": sample,
    "score": score,
    "eval-judge": eval_judge,
    "pairs": pairs,
    "eval": eval_cmd,
    "report": report,
    "export": export_cmd,
    "label": label,
}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: `error: mmalign sample: argument --eta: ...`."""

    def error(self, message: str) -> typing.NoReturn:
        """Print the one line (pointing at --help) and exit with status 2."""
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `mmalign` parser with every subcommand (each sets `command`); bad flags exit 2 with one line."""
    parser = OneLineParser(prog="mmalign", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def missing_package_message(command: str, e: ModuleNotFoundError) -> str:
    """One line naming the missing package of a subcommand and how to install it."""
    package = (e.name or "?").split(".")[0]
    return f"error: mmalign {command} needs the package {package!r}, which is not installed (pip install {package})"


def os_error_message(e: OSError) -> str:
    """`PATH: what went wrong` for a file-system error (disk full and read-only named as such)."""
    what = {
        errno.ENOSPC: "disk full (no space left on device)",
        errno.EROFS: "read-only file system",
        errno.EDQUOT: "disk quota exceeded",
    }.get(e.errno, e.strerror or str(e))
    return f"{e.filename}: {what}" if e.filename else what


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the subcommand; bad input prints one `error: ...` line and returns 2.

    This is the one place that turns the known error types (bad config, data, media, sources,
    files, training refusals) into that line; any other exception is a bug and keeps its traceback.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    # deferred: these modules load torch, which `mmalign --help` does not need
    from mmalign.config import ConfigError
    from mmalign.data.preference import DataError
    from mmalign.media import MediaError
    from mmalign.sources import SourceError
    from mmalign.trainer import TrainingError

    try:
        return COMMANDS[args.command].run(args) or 0
    except (ConfigError, DataError, MediaError, TrainingError, SourceError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "mmalign":
            raise
        print(missing_package_message(args.command, e), file=sys.stderr)
        return 2
    except OSError as e:  # a missing input, an output path that is a file, a full or read-only disk
        print(f"error: {one_line(os_error_message(e))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    """The first line of a message (library errors sometimes add paragraphs of advice)."""
    return message.strip().splitlines()[0] if message.strip() else message
