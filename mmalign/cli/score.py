"""`mmalign score`: any registered reward over media files (mmalign.scoring).

mmalign score --reward NAME [--reward-args k=v ...] [--config reward.yaml]
              (--prompts prompts.txt | --prompt TEXT | --manifest m.jsonl) [--out scores.jsonl] PATHS...
mmalign score --list

Media files of the reward's modality: images; videos (.mp4/.webm/.mov/.mkv, an animated .gif,
or a folder of frames; --num-frames N keeps N evenly spaced frames); audio (.wav/.flac/.ogg/.mp3,
mono or stereo; --downmix mixes more channels to mono). For an audio or image reward a folder
stands for its files of that modality (subfolders included).

A distribution reward (`fad`, `vendi`: the "batch" kind in --list) scores all files as one
set: it prints the set's value and --out holds each file's contribution (they sum to it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmalign.config import flag  # light: yaml and the registries


def add_reward_args(parser: argparse.ArgumentParser) -> None:
    """The flags naming a reward: --reward, --reward-args, --config, --device, --batch-size."""
    parser.add_argument("--reward", help="registered reward name (see --list)")
    parser.add_argument(
        "--reward-args",
        nargs="*",
        default=[],
        metavar="K=V",
        help="reward config fields, values parsed as YAML (validated like a run config)",
    )
    parser.add_argument("--config", help="YAML with a reward section ({name: ..., ...} or a run config's reward:)")
    parser.add_argument("--device", help="put the reward on this device (if its config has a device field)")
    parser.add_argument("--batch-size", type=flag(int, ge=1), default=8, help="files per reward call")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `score` subcommand."""
    parser = sub.add_parser(
        "score", help="score media files against prompts with any reward", description=__doc__.split("\n\n")[0]
    )
    add_reward_args(parser)
    parser.add_argument("--list", action="store_true", help="list every registered reward and exit")
    parser.add_argument("--prompts", help="text file, one prompt per line (one per file, or one for all)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable; one for all files)")
    parser.add_argument("--manifest", help="JSONL rows {path, prompt} (paths relative to the manifest)")
    parser.add_argument(
        "--out", help="write one JSON line per file: path, prompt, score (distribution rewards: contribution)"
    )
    parser.add_argument(
        "--num-frames", type=flag(int, ge=1), default=None, help="videos: keep this many evenly spaced frames"
    )
    parser.add_argument(
        "--downmix",
        action="store_true",
        help="audio: mix files with more than 2 channels to mono (the mean over channels) instead of refusing them",
    )
    parser.add_argument(
        "paths", nargs="*", help="media files: images, videos (.mp4/.webm/.gif or frame folders), audio (.wav/.flac)"
    )


def split_reward_args(args: argparse.Namespace) -> None:
    """`--reward-args k=v ... PATHS`: argparse hands the trailing paths to --reward-args; an
    item without '=' is a path, so move it back to PATHS."""
    extra = [a for a in args.reward_args or [] if "=" not in a]
    if extra and hasattr(args, "paths"):
        args.reward_args = [a for a in args.reward_args if "=" in a]
        args.paths = extra + list(args.paths or [])


def fail(msg: str) -> int:
    """Print `error: MSG` on stderr; the exit status of a command refused on bad input."""
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Score every file; print a summary table (and write --out)."""
    # deferred: torch and the reward libraries load only when the command runs (a fast `mmalign --help`)
    from mmalign import scoring
    from mmalign.config import ConfigError
    from mmalign.media import MediaError

    if args.list:
        rows = scoring.list_rewards()
        print(scoring.format_table(rows, ["name", "kind", "modality", "differentiable", "loads", "description"]))
        return 0
    try:
        split_reward_args(args)
        items = scoring.media_items(args.paths, args.prompt, args.prompts, args.manifest)
        reward, spec = scoring.build_scoring_reward(args.reward, args.reward_args, args.config, args.device)
        items = scoring.expand_folders(items, reward.modality)
        scoring.check_prompts(reward, spec["name"], items)
        if scoring.is_batch_level(reward):
            return _run_distribution(args, reward, spec, items)
        scores = scoring.score_items(reward, items, args.batch_size, args.num_frames, args.downmix)
    except (ConfigError, MediaError, OSError, ValueError, TypeError) as e:
        return fail(str(e))
    rows = [{"path": p, "prompt": pr, "score": s} for (p, pr), s in zip(items, scores)]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    summary = {"reward": spec["name"], **scoring.summarize(scores)}
    print(scoring.format_table([summary], ["reward", "n", "mean", "std", "min", "max"]))
    if args.out:
        print(f"wrote {len(rows)} scores to {args.out}")
    return 0


def _run_distribution(args: argparse.Namespace, reward, spec: dict, items) -> int:
    """A distribution reward: one value for the set, each file's contribution to --out."""
    from mmalign import scoring

    value, contrib = scoring.score_distribution(reward, items, args.batch_size, args.num_frames, args.downmix)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for (p, pr), c in zip(items, contrib):
                f.write(json.dumps({"path": p, "prompt": pr, "contribution": c}) + "\n")
    summary = {
        "reward": spec["name"],
        "n": len(items),
        "value": value,
        "higher_is_better": "yes" if getattr(reward, "higher_is_better", True) else "no",
    }
    print(scoring.format_table([summary], ["reward", "n", "value", "higher_is_better"]))
    if args.out:
        print(f"wrote {len(items)} contributions (they sum to the value) to {args.out}")
    return 0
