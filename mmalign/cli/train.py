"""`mmalign train CONFIG [key.path=value ...]`: fine-tune a generator from a YAML run config."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `train` subcommand."""
    p = sub.add_parser("train", help="fine-tune a generator from a YAML config",
                       description="Train from CONFIG. Overrides: dotted.key=value (YAML values), e.g. "
                                   "train.lr=1e-5 method.beta=2500. Under `accelerate launch` this runs DDP.")
    p.add_argument("config", help="run config YAML (configs/toy/*.yaml, configs/<model>/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--output-dir", help="run directory (default: run.output_dir or runs/<run.name>)")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="resume from the latest complete checkpoint of the run, or from a checkpoint path")
    p.add_argument("--report", action="store_true", help="print base vs aligned evaluation (e.g. the toy world's gold accuracy)")


def run(args: argparse.Namespace) -> int:
    """Train from the config; with --report, print base vs aligned evaluation."""
    # deferred: torch and the model libraries load only when the command runs (a fast `mmalign --help`)
    from mmalign.config import load_config
    from mmalign.evaluation import format_comparison
    from mmalign.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg, run_dir=args.output_dir, resume=args.resume).fit()
    run_dir = Path(args.output_dir or cfg.run.output_dir or f"runs/{cfg.run.name}")
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
    if args.report:
        evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
        if len(evals) >= 2:
            print(f"\nbase (step {evals[0]['step']}) vs aligned (step {evals[-1]['step']}) on "
                  f"{evals[-1]['eval']['n_samples']} evaluation samples:")
            print(format_comparison(evals[0]["eval"], evals[-1]["eval"]))
    print(f"run directory: {run_dir} (config.yaml, metrics.jsonl, samples/, checkpoints/, final/, summary.json)")
    return 0
