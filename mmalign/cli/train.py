"""`mmalign train CONFIG [key.path=value ...]`: fine-tune a generator from a YAML run config."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `train` subcommand."""
    p = sub.add_parser(
        "train",
        help="fine-tune a generator from a YAML config",
        description="Train from CONFIG. Overrides: dotted.key=value (YAML values), e.g. "
        "train.lr=1e-5 method.beta=2500. Under `accelerate launch` this runs DDP.",
    )
    p.add_argument("config", help="run config YAML (configs/toy/*.yaml, configs/<model>/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--output-dir", help="run directory (default: run.output_dir or runs/<run.name>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="resume from the latest complete checkpoint of the run, or from a checkpoint path",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start anew in a directory that holds a run: the old run is moved to <dir>.replaced-<time>",
    )
    p.add_argument(
        "--report", action="store_true", help="print base vs aligned evaluation (e.g. the toy world's gold accuracy)"
    )


def run(args: argparse.Namespace) -> int:
    """Train from the config; with --report, print base vs aligned evaluation."""
    # deferred: torch and the model libraries load only when the command runs (a fast `mmalign --help`)
    from mmalign.config import load_config
    from mmalign.evaluation import format_comparison
    from mmalign.rundir import RunDirError, existing_run
    from mmalign.trainer import RunInterrupted, Trainer

    if args.resume and args.overwrite:
        print("error: --resume and --overwrite exclude each other", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.output_dir or cfg.run.output_dir or f"runs/{cfg.run.name}")
    try:
        summary = Trainer(cfg, run_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite).fit()
    except RunInterrupted as e:
        print(interrupted_message(e, args, run_dir), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before training started (loading models, reading data)
        again = f"--resume {args.resume}" if args.resume else "--overwrite" if existing_run(run_dir) else ""
        print(
            f"interrupted before the first training step; nothing new to resume. Start again with: "
            f"{command(args, run_dir, again)}",
            file=sys.stderr,
        )
        return 130
    except RunDirError as e:  # locked, or a disk that is full / read-only
        print(f"error: {e}", file=sys.stderr)
        return 2
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
    if args.report:
        evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
        if len(evals) >= 2:
            print(
                f"\nbase (step {evals[0]['step']}) vs aligned (step {evals[-1]['step']}) on "
                f"{evals[-1]['eval']['n_samples']} evaluation samples:"
            )
            print(format_comparison(evals[0]["eval"], evals[-1]["eval"]))
    print(f"run directory: {run_dir} (config.yaml, metrics.jsonl, samples/, checkpoints/, final/, summary.json)")
    return 0


def command(args: argparse.Namespace, run_dir: Path, flag: str) -> str:
    """The `mmalign train` command line the user gave, with the run directory spelled out and `flag` added."""
    parts = ["mmalign", "train", args.config, *args.overrides, "--output-dir", str(run_dir), *flag.split()]
    return shlex.join(parts)


def interrupted_message(e, args: argparse.Namespace, run_dir: Path) -> str:
    """What a stopped run saved and the exact command that continues it."""
    how = "abandoned step" if e.abandoned else "stopped after step"
    step = e.step + 1 if e.abandoned else e.step
    if e.checkpoint is None:
        return (
            f"interrupted ({how} {step}) before the first checkpoint; nothing to resume. Start again with: "
            f"{command(args, run_dir, '--overwrite')}"
        )
    return (
        f"interrupted ({how} {step}); checkpoint {e.checkpoint}. Resume with: "
        f"{command(args, run_dir, '--resume latest')}"
    )
