"""`mmalign pairs`: VLM preference pairs from AI feedback (mmalign.data.vlm_feedback)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mmalign.config import flag  # light: yaml and the registries


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `pairs` subcommand."""
    parser = sub.add_parser(
        "pairs",
        help="VLM preference pairs from AI feedback: sample K responses, rank with a judge",
        description="For each item (image, prompt) sample K responses from --model, score them with the image judge "
        "--judge, write OUT/pairs.jsonl (chosen = best, rejected = worst, margin = score difference; "
        "ties dropped).",
    )
    parser.add_argument("--model", required=True, help="the policy: hub id or local directory (or toy:vlm_toy)")
    parser.add_argument("--items", required=True, help="items JSONL: image(s), prompt[, reference]")
    parser.add_argument("--judge", required=True, help="an image reward from the registry, e.g. vlm_judge")
    parser.add_argument(
        "--judge-args",
        nargs="*",
        default=[],
        metavar="K=V",
        help="judge config fields, values parsed as YAML (like `mmalign score --reward-args`)",
    )
    parser.add_argument(
        "--template",
        default=None,
        help="the judge's question, with {prompt} and {response} (the judge's own "
        "yes_no_template / likert_template default to '{prompt}' here; default: "
        "mmalign.data.vlm_feedback.DEFAULT_JUDGE_TEMPLATE, a yes/no correctness question)",
    )
    parser.add_argument("--k", type=flag(int, ge=2), default=4, help="responses sampled per item (>= 2)")
    parser.add_argument(
        "--include-reference", action="store_true", help="the item's reference answer joins the K candidates"
    )
    parser.add_argument("--temperature", type=flag(float, gt=0), help="default: the generator config's (1.0)")
    parser.add_argument("--top-p", type=flag(float, gt=0, le=1), help="default: the generator config's (1.0)")
    parser.add_argument("--max-new-tokens", type=flag(int, ge=1), default=64)
    parser.add_argument("--batch-size", type=flag(int, ge=1), default=8, help="items per rollout call")
    parser.add_argument("--seed", type=flag(int, ge=0), default=0)
    parser.add_argument("--device")
    parser.add_argument("--out", default="pairs", help="output directory (pairs.jsonl)")


def run(args: argparse.Namespace) -> int:
    """Build the pairs; every input is checked before a model loads."""
    # deferred: torch and the model libraries load only when the command runs (a fast `mmalign --help`)
    from mmalign import registry
    from mmalign.config import ConfigError, parse_dataclass
    from mmalign.data.vlm_feedback import (
        DEFAULT_JUDGE_TEMPLATE,
        build_feedback_pairs,
        compose_texts,
        judge_scorer,
        read_items,
    )
    from mmalign.scoring import build_reward_from_spec, reward_spec, validate_reward_spec

    template = args.template if args.template is not None else DEFAULT_JUDGE_TEMPLATE
    if args.k < 2:
        raise ConfigError(f"--k: K must be >= 2 to rank responses, got {args.k}")
    items = read_items(args.items)  # DataError / MediaError naming the file and row
    try:
        spec = reward_spec(args.judge, args.judge_args)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--reward-args", "--judge-args")) from None
    try:
        entry = registry.lookup("reward", spec["name"])
    except KeyError as e:
        raise ConfigError(f"--judge: {e.args[0]}") from None
    modality = getattr(entry.build, "modality", None)
    if modality is not None and modality != "image":
        raise ConfigError(
            f"--judge {spec['name']}: scores {modality}, but pairs need a judge of images "
            f"(modality 'image', e.g. vlm_judge)"
        )
    fields = getattr(entry.config, "__dataclass_fields__", {})
    for key in ("yes_no_template", "likert_template"):  # the composed question is the whole question
        if key in fields:
            spec.setdefault(key, "{prompt}")
    if args.device and "device" in fields:
        spec.setdefault("device", args.device)
    validate_reward_spec(spec, "judge")
    try:
        compose_texts(template, ["x"], ["y"])
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--template: bad template ({e}); fill {{prompt}} and {{response}}") from None
    gen_args: dict[str, Any] = {"pretrained": args.model, "finetune": "none", "max_new_tokens": args.max_new_tokens}
    gen_args.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None})
    gen_entry = registry.lookup("generator", "vlm")
    generator = gen_entry.build(parse_dataclass(gen_entry.config, gen_args, "generator"))
    if args.device:
        generator.to(args.device)
    reward = build_reward_from_spec(spec, "judge")
    if getattr(reward, "modality", None) != "image":
        raise ConfigError(f"--judge {spec['name']}: scores {reward.modality}, but pairs need a judge of images")
    try:
        scorer = judge_scorer(reward, template)
    except ValueError as e:
        raise ConfigError(f"--template: {e}") from None
    report = build_feedback_pairs(
        generator,
        items,
        scorer,
        args.k,
        args.out,
        include_reference=args.include_reference,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if not report.pairs:
        print("error: no pairs written (every item tied or lacked a reference answer)", file=sys.stderr)
        return 1
    return 0
