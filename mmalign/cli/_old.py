"""mmalign command line: train, sample, score, eval, pairs."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg, run_dir=args.output_dir, resume=args.resume).fit()
    run_dir = Path(args.output_dir or cfg.run.output_dir or f"runs/{cfg.run.name}")
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
    if args.report:
        import json

        from mmalign.evaluation import format_comparison

        evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
        if len(evals) >= 2:
            print(f"\nbase (step {evals[0]['step']}) vs aligned (step {evals[-1]['step']}) on "
                  f"{evals[-1]['eval']['n_samples']} evaluation samples:")
            print(format_comparison(evals[0]["eval"], evals[-1]["eval"]))
    print(f"run directory: {run_dir} (config.yaml, metrics.jsonl, samples/, checkpoints/, final/, summary.json)")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts and args.prompts.startswith("toy:"):  # toy:heldout | toy:train | toy:all
        from mmalign.data.generated import load_prompts

        try:
            prompts += load_prompts(args.prompts)
        except ValueError as e:
            raise SystemExit(f"error: --prompts: {e}") from None
    elif args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise SystemExit(f"error: {p}: prompts file not found")
        prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from mmalign import registry
    from mmalign.config import _parse_dataclass, load_config
    from mmalign.guidance.cli import run_sample, validate_sample_args

    prompts = _read_prompts(args)  # bad input fails before any model loads
    validate_sample_args(args)
    label_scale = _check_label_pairs(args) if args.label_pairs else None
    if args.config:
        cfg = load_config(args.config)
        gen_cfg = cfg.generator.args
        name = cfg.generator.name
    else:
        if not args.pretrained:
            raise SystemExit("error: give --model MODEL (or --pretrained MODEL) or --config RUN_CONFIG")
        name = args.generator
        gen_cfg = _parse_dataclass(registry.lookup("generator", name).config,
                                   {"pretrained": args.pretrained, "finetune": "none"}, "generator")
    gen = registry.lookup("generator", name).build(gen_cfg)
    if args.weights:
        w = Path(args.weights)
        gen.load_trained(w.parent if w.is_file() else w)  # a LoRA file or its directory
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen.to(device)
    if args.label_pairs:
        from mmalign.methods.d3po import write_for_labelling

        reps = [p for p in prompts for _ in range(args.n)]
        ro = write_for_labelling(gen, reps, [args.seed + i for i in range(len(reps))], args.out, args.steps,
                                 label_scale, args.eta, args.batch_size)
        print(f"wrote {len(reps)} pairs ({len(ro)} samples) to {args.out}: buffer.safetensors, images/, pairs.jsonl. "
              f"Set choice (0|1) or tie: true on every line of pairs.jsonl, then train D3PO with "
              f"method.buffer={args.out} method.labels={Path(args.out) / 'pairs.jsonl'} reward=null")
        return 0
    return run_sample(args, gen, prompts, device)  # mmalign/guidance/cli.py


def _check_label_pairs(args: argparse.Namespace) -> float:
    """--label-pairs: plain CFG sampling with stochastic steps; returns the CFG scale."""
    from mmalign.config import ConfigError
    from mmalign.guidance.cli import parse_guidance

    mode, scale = parse_guidance(args.guidance, args.cfg_scale)
    if mode != "cfg" or args.reward:
        raise ConfigError("--label-pairs: samples with plain CFG (--cfg-scale) and no --reward; "
                          "the preferences come from the labeller")
    if args.eta <= 0:
        raise ConfigError("--label-pairs: D3PO trains on the stochastic sampling steps; give --eta > 0 (e.g. 1.0)")
    return scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a generator from a YAML config",
                       description="Train from CONFIG. Overrides: dotted.key=value (YAML values), e.g. "
                                   "train.lr=1e-5 method.beta=2500. Under `accelerate launch` this runs DDP.")
    p.add_argument("config", help="run config YAML (configs/toy/*.yaml, configs/<model>/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--output-dir", help="run directory (default: run.output_dir or runs/<run.name>)")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="resume from the latest complete checkpoint of the run, or from a checkpoint path")
    p.add_argument("--report", action="store_true", help="toy world: print base vs aligned gold accuracy")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="generate images from prompts (optionally with trained weights)",
                       description="Generate images; --guidance cfg | dynamic-cfg | reward | best-of-n | beam "
                                   "(rewards by --reward NAME[:WEIGHT]). Writes PNGs, grid.png, samples.jsonl; with "
                                   "--label-pairs, a D3PO round for human labelling instead.")
    p.add_argument("--model", "--pretrained", dest="pretrained", help="hub id or local diffusers directory")
    p.add_argument("--config", help="take the generator from a run config instead")
    p.add_argument("--generator", default="sd", help="generator registry name (default: sd)")
    p.add_argument("--lora", "--weights", dest="weights",
                   help="trained weights: a run's final/ directory (LoRA or UNet) or its LoRA .safetensors")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file, one prompt per line (or toy:heldout / toy:train)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", default=None, metavar="{cfg,dynamic-cfg,reward,best-of-n,beam}",
                   help="guidance method (default cfg); a number N is short for `cfg --cfg-scale N`")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--label-pairs", action="store_true",
                   help="write a round for human labelling (D3PO) instead: 2 trajectories per prompt (x --n) from one "
                        "initial noise; OUT/buffer.safetensors + buffer.json, OUT/images/<sample id>.png and an "
                        "OUT/pairs.jsonl template (needs --eta > 0)")
    from mmalign.guidance.cli import add_sample_args

    add_sample_args(p)
    p.set_defaults(fn=cmd_sample)

    try:
        from mmalign import scoring

        p = sub.add_parser("score", help="score media files against prompts with any reward")
        scoring.add_score_args(p)
        p.set_defaults(fn=scoring.run_score)
        p = sub.add_parser("eval-judge", help="agreement of a reward/judge with human preference labels")
        scoring.add_eval_judge_args(p)
        p.set_defaults(fn=scoring.run_eval_judge)
    except ImportError:
        pass
    from mmalign.data import vlm_feedback

    p = sub.add_parser("pairs", help="VLM preference pairs from AI feedback: sample K responses, rank with a judge",
                       description="For each item (image, prompt) sample K responses from --model, score them with "
                                   "the image judge --judge, write OUT/pairs.jsonl (chosen = best, rejected = worst, "
                                   "margin = score difference; ties dropped).")
    vlm_feedback.add_pairs_args(p)
    p.set_defaults(fn=vlm_feedback.run_pairs)
    try:
        from mmalign import evaluation

        p = sub.add_parser("eval", help="toy world: gold accuracy, proxy reward and diversity of a model or run")
        evaluation.add_eval_args(p)
        p.set_defaults(fn=evaluation.run_eval)
    except ImportError:
        pass

    args = parser.parse_args(argv)
    from mmalign.config import ConfigError
    from mmalign.data.preference import DataError
    from mmalign.media import MediaError
    from mmalign.trainer import TrainingError

    try:
        return args.fn(args) or 0
    except (ConfigError, DataError, MediaError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
