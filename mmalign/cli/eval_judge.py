"""`mmalign eval-judge`: agreement of a reward or judge with human preference labels (mmalign.scoring).

mmalign eval-judge --reward NAME [--reward-args k=v ...] --pairs pairs.jsonl [--pairwise] [--out judged.jsonl]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from mmalign.config import flag  # light: yaml and the registries

from .score import add_reward_args, fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `eval-judge` subcommand."""
    parser = sub.add_parser(
        "eval-judge",
        help="agreement of a reward/judge with human preference labels",
        description=__doc__.split("\n\n")[0],
    )
    add_reward_args(parser)
    parser.add_argument(
        "--pairs",
        required=True,
        help="JSONL rows {prompt, chosen, rejected[, category]} (or {prompt, image0, image1, label})",
    )
    parser.add_argument(
        "--pairwise",
        action="store_true",
        help="ask the judge which of the two is better (VLM / audio judges), in both orders "
        "(chosen first, rejected first), instead of comparing scores; reports position_bias",
    )
    parser.add_argument(
        "--tie-eps",
        type=flag(float, ge=0),
        default=0.0,
        help="a pair is a tie when |score(chosen) - score(rejected)| <= tie-eps "
        "(pairwise: an answer is a tie when |P(first better) - 0.5| <= tie-eps)",
    )
    parser.add_argument("--out", help="write one JSON line per pair with the judge's scores and verdict")


def run(args: argparse.Namespace) -> int:
    """Judge every pair; print agreement per category and overall (and write --out)."""
    # deferred: torch and the reward libraries load only when the command runs (a fast `mmalign --help`)
    from mmalign import scoring
    from mmalign.config import ConfigError
    from mmalign.media import MediaError

    try:
        pairs = scoring.read_pairs(args.pairs)
        reward, spec = scoring.build_scoring_reward(args.reward, args.reward_args, args.config, args.device)
        results = scoring.judge_pairs(reward, pairs, args.batch_size, args.pairwise)
    except (ConfigError, MediaError, OSError, ValueError, TypeError) as e:
        return fail(str(e))
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r)
    rows = [
        {"category": cat, **scoring.agreement_row(by_cat[cat], args.pairwise, args.tie_eps)}
        for cat in (sorted(by_cat) if len(by_cat) > 1 else [])
    ]
    rows.append({"category": "overall", **scoring.agreement_row(results, args.pairwise, args.tie_eps)})
    human_ties = sum(1 for p in pairs if p["human_tie"])
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps({k: v for k, v in r.items() if k != "human_tie"}) + "\n")
    print(
        f"judge: {spec['name']}  pairs: {len(results)}"
        + (f"  (human ties skipped: {human_ties})" if human_ties else "")
    )
    columns = ["category", "n", "acc_with_ties", "acc_without_ties", "tie_rate"]
    if args.pairwise:
        print(
            "both orders per pair (2n answers); position_bias: fraction of decided answers picking the "
            "first-shown item (0.5 none, 1.0 always first)"
        )
        columns.append("position_bias")
    print(scoring.format_table(rows, columns))
    return 0
