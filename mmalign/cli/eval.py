"""`mmalign eval`: compare a run's base model with its trained weights (mmalign.evaluation).

`mmalign eval --run RUN_DIR` evaluates on a prompt set (default: the toy world's held-out
captions) and writes eval.json and a before/after grid PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmalign.config import ConfigError, flag  # light: yaml and the registries


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `eval` subcommand."""
    p = sub.add_parser(
        "eval",
        help="gold accuracy (toy world), reward and diversity of a model or run",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--run", help="a run directory (uses its config.yaml, base model vs final/)")
    p.add_argument("--pretrained", help="or: a diffusers model directory / hub id")
    p.add_argument("--weights", help="trained weights (a run's final/ directory) to compare against the base")
    p.add_argument("--reward-config", help="YAML file with a `reward:` section (default: the run's reward)")
    p.add_argument("--prompts-from", default="toy:heldout", help="a prompt set (toy:heldout, toy:train) or a .txt file")
    p.add_argument("--max-prompts", type=flag(int, ge=1))
    p.add_argument("--seeds", type=flag(int, ge=1), default=2, help="seeds per prompt")
    p.add_argument("--steps", type=flag(int, ge=1), default=20)
    p.add_argument("--guidance", type=flag(float, ge=0), default=5.0)
    p.add_argument("--no-gold", action="store_true", help="skip the gold evaluator (the toy world's)")
    p.add_argument("--out", help="output directory (default: <run>/eval or ./eval)")


def run(args: argparse.Namespace) -> int:
    """Evaluate the base model (and the trained weights); write eval.json and before_after.png."""
    # deferred: torch and the model libraries load only when the command runs (a fast `mmalign --help`)
    import torch

    from mmalign import registry
    from mmalign.config import Component, load_config, parse_component, parse_dataclass
    from mmalign.evaluation import evaluate_generator, expand_prompts, format_comparison
    from mmalign.media import image_grid

    reward_comp = None
    if args.run:
        cfg = load_config(Path(args.run) / "config.yaml")
        gen_comp, reward_comp = cfg.generator, cfg.reward
        weights = args.weights or str(Path(args.run) / "final")
    elif args.pretrained:
        entry = registry.lookup("generator", "sd")
        gen_comp = Component(
            "sd", parse_dataclass(entry.config, {"pretrained": args.pretrained, "finetune": "none"}, "generator")
        )
        weights = args.weights
    else:
        raise ConfigError("give --run RUN_DIR or --pretrained MODEL")
    if args.reward_config:
        from mmalign.scoring import reward_spec

        reward_comp = parse_component("reward", reward_spec(None, None, args.reward_config), "reward")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = registry.lookup("generator", gen_comp.name).build(gen_comp.args).to(device)
    reward = registry.lookup("reward", reward_comp.name).build(reward_comp.args) if reward_comp else None
    if reward is not None and hasattr(reward, "to"):
        reward.to(device)
    prompts = expand_prompts([], args.prompts_from, args.max_prompts)
    kw = dict(seeds_per_prompt=args.seeds, num_steps=args.steps, guidance_scale=args.guidance, gold=not args.no_gold)
    out_dir = Path(args.out or (Path(args.run) / "eval" if args.run else "eval"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"prompts_from": args.prompts_from, "n_prompts": len(prompts), **kw}
    if gen.cfg.finetune == "lora":  # base = adapters disabled
        with gen.reference():
            base, base_img = evaluate_generator(gen, reward, prompts, **kw)
    else:
        base, base_img = evaluate_generator(gen, reward, prompts, **kw)
    results["base"] = base
    grids = [base_img[:16]]
    if weights:
        gen.load_trained(weights)
        after, after_img = evaluate_generator(gen, reward, prompts, **kw)
        results["trained"] = after
        grids.append(after_img[:16])
        print(format_comparison(base, after))
    else:
        print(json.dumps(base, indent=2))
    image_grid(torch.cat(grids), nrow=16).save(out_dir / "before_after.png")
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'before_after.png'} (top row base, bottom row trained)")
    return 0
