"""Evaluation of a generator on fixed prompts and seeds: reward, toy-world gold accuracy
(overall, per caption kind, per constraint) and diversity (mean pairwise pixel distance
across the seeds of one caption, so mode collapse is visible).

`mmalign eval --run RUN_DIR` compares the run's base model with its trained weights on
the toy world's held-out captions and writes eval.json and a before/after grid PNG.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def expand_prompts(prompts: list[str], prompts_from: str | None, max_prompts: int | None) -> list[str]:
    if prompts_from:
        from mmalign.data.generated import load_prompts

        prompts = load_prompts(prompts_from)
    return prompts[:max_prompts] if max_prompts else prompts


@torch.no_grad()
def evaluate_generator(generator, reward, prompts: list[str], seeds_per_prompt: int = 1, seed: int = 1234,
                       num_steps: int = 20, guidance_scale: float = 5.0, gold: bool = False,
                       batch_size: int = 64) -> tuple[dict[str, Any], torch.Tensor]:
    """Deterministic DDIM (eta=0) samples of every prompt x seed; returns (metrics, images).

    A reward that only compares pairs (a judge with `mode: pairwise`) gives no reward column;
    the metrics say so under `reward_skipped`."""
    out: dict[str, Any] = {"n_samples": len(prompts) * seeds_per_prompt}
    if reward is not None and not getattr(reward, "scores_single", True):
        out["reward_skipped"] = f"{getattr(reward, 'name', 'reward')}: pairwise-only judge, no per-sample score"
        reward = None
    rep = [p for p in prompts for _ in range(seeds_per_prompt)]
    seeds = [seed + i for i in range(len(rep))]
    images, rewards = [], []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(rep), batch_size), desc=f"eval {len(rep)} samples", leave=False, dynamic_ncols=True):
        ro = generator.rollout(rep[i:i + batch_size], num_steps=num_steps, guidance_scale=guidance_scale, eta=0.0,
                               seeds=seeds[i:i + batch_size], need_log_probs=False)
        images.append(ro.samples.images.float().cpu())
        if reward is not None:
            rewards.append(reward(ro.samples, rep[i:i + batch_size]).float().cpu())
    images = torch.cat(images)
    if rewards:
        out["reward"] = float(torch.cat(rewards).mean())
    if gold:
        from mmalign.toy.evaluate import diversity, gold_report

        rep_ = gold_report(images, rep)
        out["gold_accuracy"] = rep_["accuracy"]
        out["gold_compositional"] = rep_["compositional"]
        out["gold_per_kind"] = rep_["per_kind"]
        out["gold_per_constraint"] = rep_["per_constraint"]
    if seeds_per_prompt > 1:
        from mmalign.toy.evaluate import diversity

        groups = [list(images[i * seeds_per_prompt:(i + 1) * seeds_per_prompt]) for i in range(len(prompts))]
        out["diversity"] = diversity(groups)
    return out, images


def evaluate_config(generator, reward, e) -> tuple[dict[str, Any], torch.Tensor]:
    """evaluate_generator with the settings of an `eval:` config block (EvalConfig)."""
    return evaluate_generator(generator, reward, expand_prompts(e.prompts, e.prompts_from, e.max_prompts),
                              e.images_per_prompt, e.seed, e.num_steps, e.guidance_scale, e.gold)


def format_comparison(before: dict, after: dict) -> str:
    rows = [("gold accuracy", "gold_accuracy"), ("gold compositional", "gold_compositional"),
            ("proxy reward", "reward"), ("diversity", "diversity")]
    lines = [f"{'':22s}{'base':>10s}{'aligned':>10s}{'delta':>10s}"]
    for label, k in rows:
        if k in before and k in after:
            lines.append(f"{label:22s}{before[k]:10.4f}{after[k]:10.4f}{after[k] - before[k]:+10.4f}")
    for kind in before.get("gold_per_kind", {}):
        a, b = before["gold_per_kind"][kind], after["gold_per_kind"].get(kind, float("nan"))
        lines.append(f"{'  gold ' + kind:22s}{a:10.4f}{b:10.4f}{b - a:+10.4f}")
    return "\n".join(lines)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a run directory (uses its config.yaml, base model vs final/)")
    p.add_argument("--pretrained", help="or: a diffusers model directory / hub id")
    p.add_argument("--weights", help="trained weights (a run's final/ directory) to compare against the base")
    p.add_argument("--reward-config", help="YAML file with a `reward:` section (default: the run's reward)")
    p.add_argument("--prompts-from", default="toy:heldout", help="toy:heldout | toy:train | a .txt file")
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--no-gold", action="store_true", help="skip the toy world's gold evaluator")
    p.add_argument("--out", help="output directory (default: <run>/eval or ./eval)")


def run_eval(args: argparse.Namespace) -> int:
    import yaml

    from mmalign import registry
    from mmalign.config import _parse_dataclass, _parse_component, load_config
    from mmalign.media import image_grid

    reward_comp = None
    if args.run:
        cfg = load_config(Path(args.run) / "config.yaml")
        gen_comp, reward_comp = cfg.generator, cfg.reward
        weights = args.weights or str(Path(args.run) / "final")
    elif args.pretrained:
        entry = registry.lookup("generator", "sd")
        from mmalign.config import Component

        gen_comp = Component("sd", _parse_dataclass(entry.config, {"pretrained": args.pretrained, "finetune": "none"},
                                                       "generator"))
        weights = args.weights
    else:
        raise SystemExit("error: give --run RUN_DIR or --pretrained MODEL")
    if args.reward_config:
        reward_comp = _parse_component("reward", yaml.safe_load(Path(args.reward_config).read_text())["reward"],
                                       "reward")
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
